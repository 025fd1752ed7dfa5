"""Per-layer gradient L2 norm and max |g| over iterations, and their plot.

The kind of figure Yong et al. use to show gradient centralization taming
the gradient ("Gradient Centralization", ECCV 2020, arXiv:2004.01461, the
L2 norm and maximum of a layer's gradient against iterations, with and
without GC): record one run per configuration with
:class:`GradientStatsRecorder`, then draw them together with
:func:`plot_gradient_stats`. Plotting needs matplotlib (the ``examples``
extra); recording does not.
"""

import keras
import tensorflow as tf

from keras_gradops.training.gradient_ops_model import GradientOpsModel

STATS = (("l2_norm", "gradient L2 norm"), ("max_abs", "gradient max |g|"))


class GradientStatsRecorder(keras.callbacks.Callback):
    """Records each chosen layer's gradient L2 norm and max ``|g|`` during ``fit``.

    Works with :class:`keras_gradops.GradientOpsModel` (and ``GuessedGradientModel``):
    the train step writes the last step's statistics of the gradient summed over
    replicas (NaN for a step skipped as non-finite), the callback reads them every ``every_n_steps`` steps (with
    ``steps_per_execution > 1``, the last step of each execution).

    Args:
        layers: names (or layers) of the wrapped model's layers to watch, or
            ``True`` for every top-level layer with trainable weights.
        path: if given, a PNG of both statistics against the iteration is
            written there when training ends.
        stage: ``"applied"``: the gradient the optimizer receives, after
            clipping and centralization; ``"raw"``: before them.
        every_n_steps: record one step in this many.
        label: the run's name in the plot's legend.
        log_dir: if given, each recorded step is also written as TensorBoard
            scalars ``gradient/<layer>/l2_norm`` and ``gradient/<layer>/max_abs``
            (step = the iteration) to an event file in this directory.

    Attributes:
        history: ``{layer name: {"step": [...], "l2_norm": [...], "max_abs": [...]}}``,
            steps counted from 1 over all ``fit`` calls with this callback.

    Example:
        >>> recorder = GradientStatsRecorder(["conv1"], path="gradients.png")
        >>> # model = kgo.GradientOpsModel(net, centralize=True); model.fit(..., callbacks=[recorder])
    """

    def __init__(self, layers, path=None, stage="applied", every_n_steps=1, label=None, log_dir=None):
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be a positive int. Received: every_n_steps={every_n_steps!r}")
        self.layers = layers
        self.path = path
        self.stage = stage
        self.every_n_steps = every_n_steps
        self.label = label
        self.log_dir = log_dir
        self.history = {}
        self._writer = None
        self._step = 0
        self._probe = None

    def set_model(self, model):
        if not isinstance(model, GradientOpsModel):
            raise TypeError(
                "GradientStatsRecorder reads the gradient inside the train step of a "
                "keras_gradops.GradientOpsModel; wrap the model: GradientOpsModel(model). "
                f"Received: {type(model).__name__}"
            )
        super().set_model(model)

    def on_train_begin(self, logs=None):
        self._probe = self.model.watch_gradients(self.layers, self.stage)
        self.model.make_train_function()  # traced again, now writing the probe
        for name in self._probe.layer_names:
            self.history.setdefault(name, {"step": [], "l2_norm": [], "max_abs": []})
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every_n_steps:
            return
        for name, (l2_norm, max_abs) in zip(self._probe.layer_names, self._probe.read()):
            record = self.history[name]
            record["step"].append(self._step)
            record["l2_norm"].append(float(l2_norm))
            record["max_abs"].append(float(max_abs))
            if self._writer is not None:
                with self._writer.as_default(step=self._step):
                    tf.summary.scalar(f"gradient/{name}/l2_norm", float(l2_norm))
                    tf.summary.scalar(f"gradient/{name}/max_abs", float(max_abs))

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
        self.model.watch_gradients(None)
        self._probe = None
        if self.path:
            plot_gradient_stats({self.label or self.stage: self.history}, self.path)


def plot_gradient_stats(runs, path, title=None):
    """Writes a PNG: gradient L2 norm and max ``|g|`` against iteration, log scale.

    Args:
        runs: ``{run label: GradientStatsRecorder.history}``, e.g.
            ``{"with GC": gc.history, "without GC": plain.history}``.
        path: the PNG file to write.
        title: optional figure title.

    Returns:
        ``path``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "plot_gradient_stats needs matplotlib: pip install 'keras-gradops[examples]' or matplotlib."
        ) from error
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for ax, (key, ylabel) in zip(axes, STATS):
        for run, history in runs.items():
            for layer, record in history.items():
                label = f"{run}: {layer}" if len(runs) > 1 or len(history) > 1 else layer
                ax.plot(record["step"], record[key], label=label, linewidth=1)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=120)
    return path
