"""GradientOpsModel: any Keras model trained with the gradient chain, telemetry and guards.

    model = kgo.GradientOpsModel(net, global_clipnorm=1.0, centralize=True, skip_nonfinite=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=...)
    history = model.fit(...)   # logs: loss, ..., grad_norm, clipped_fraction, clip_threshold, skipped_steps

The model delegates inference, export and serialization to the model it
wraps; its train step is :class:`~keras_gradops.training.train_step.ChainTrainStep`.
"""

import warnings

import keras
import tensorflow as tf

from keras_gradops import keras_internals
from keras_gradops.arguments import check_bool
from keras_gradops.pipeline.chain import GradientChain
from keras_gradops.pipeline.clipping import OPTIONS as CLIPPING_OPTIONS
from keras_gradops.pipeline.clipping import clipping_from_options
from keras_gradops.training import loss_scaling
from keras_gradops.training.gradient_probe import GradientProbe
from keras_gradops.training.layer_groups import resolve_layers
from keras_gradops.training.skip_limit import SkipLimit, check_max_consecutive_skips
from keras_gradops.training.telemetry import Telemetry
from keras_gradops.training.train_step import ChainTrainStep


def _layer_norm_names(model, layer_norms):
    if layer_norms is None or layer_norms is False:
        return ()
    if layer_norms is True and not model.built:
        raise ValueError(
            "`layer_norms=True` reads the layers with trainable weights of a built model; "
            f"build {model.name!r} first or pass a list of layer names."
        )
    if layer_norms is not True and (
        isinstance(layer_norms, (str, keras.layers.Layer)) or not isinstance(layer_norms, (list, tuple))
    ):
        raise TypeError(
            "`layer_norms` must be None, True or a list of layer names or layers. "
            f"Received: layer_norms={layer_norms!r}"
        )
    if layer_norms is True:
        return tuple(layer.name for layer in resolve_layers(model, True))
    names = {layer.name for layer in keras_internals.all_layers(model)}
    chosen = [entry.name if isinstance(entry, keras.layers.Layer) else entry for entry in layer_norms]
    for name in chosen:
        if name not in names:
            raise ValueError(f"`layer_norms`: no layer {name!r} in model {model.name!r}. Layers: {sorted(names)}")
    return tuple(chosen)


def _python_number(value):
    return float(value) if tf.is_tensor(value) and value.shape.rank == 0 else value


@keras.saving.register_keras_serializable(package="keras_gradops")
class GradientOpsModel(keras_internals.MultiWorkerSymbolicBuildMixin, ChainTrainStep, keras.Model):
    """Trains a Keras model with the gradient chain and any Keras optimizer, logging telemetry.

    Clipping (global-norm, per-tensor, value or adaptive, Brock et al. 2021)
    and gradient centralization (Yong et al., ECCV 2020) run on the gradient
    summed over replicas, inside ``optimizer.apply``; the pre-clip norm, the
    share of clipped steps and the skipped non-finite steps are logged as
    epoch means. ``predict``, ``evaluate``, ``call`` and ``export`` behave as
    the wrapped model's. Subclasses provide another gradient source by
    overriding :meth:`compute_gradients`. Works under ``MirroredStrategy`` and
    ``MultiWorkerMirroredStrategy`` (where Keras' own ``fit`` fails for every
    model, keras-team/keras#20585), with exactly one all-reduce of the
    gradient per step.

    Args:
        model: the ``keras.Model`` to train (available as ``self.model``).
        global_clipnorm: clip the global norm of the aggregated gradient to
            this: a positive number, or an adaptive threshold
            (:mod:`keras_gradops.thresholds`).
        clipnorm: clip each gradient tensor's norm to this.
        clipvalue: clip each element to ``[-clipvalue, clipvalue]``.
        adaptive_clipping, adaptive_clipping_eps: AGC (Brock et al. 2021):
            each output unit's gradient norm at most
            ``adaptive_clipping * max(||W_i||, adaptive_clipping_eps)``.
        centralize: gradient centralization (Yong et al., ECCV 2020) of every
            weight of rank >= 2 with a per-unit fan-in.
        conv_only: with ``centralize``, convolution kernels only (rank >= 4).
        fan_in_axes: ``{variable.path: axes or None}``; ``None`` reads it from
            ``model`` with :func:`keras_gradops.fan_in_axes`.
        skip_nonfinite: a step whose aggregated gradient has a NaN/Inf changes
            no weight and no optimizer variable, ``iterations`` included, and
            is counted in ``skipped_steps``; ``grad_norm`` and
            ``clipped_fraction`` average the applied steps.
        max_consecutive_skips: with ``skip_nonfinite``, stop ``fit`` (with a
            warning) after this many skipped steps in a row.
        layer_norms: ``True`` (every top-level layer with trainable weights) or
            a list of layer names: log ``grad_norm/<layer>``.
        **kwargs: ``keras.Model`` arguments (``name``, ...). The dtype policy
            defaults to the wrapped model's, so ``compile`` adds loss scaling
            when that is ``mixed_float16``.

    There is no L2 ``weight_decay`` option: the optimizer's ``weight_decay``
    is decoupled decay, and an L2 penalty in the loss (``kernel_regularizer``)
    reaches the gradient before centralization, as in the reference ``SGD_GC``.

    Raises:
        TypeError: ``model`` is not a Keras model.
        ValueError: an invalid or conflicting option.

    Example:
        >>> net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> model = GradientOpsModel(net, global_clipnorm=1.0, centralize=True)
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> history = model.fit(np.ones((8, 3)), np.zeros((8, 2)), verbose=0)
        >>> sorted(history.history)
        ['clip_threshold', 'clipped_fraction', 'grad_norm', 'loss']
    """

    def __init__(
        self,
        model,
        global_clipnorm=None,
        clipnorm=None,
        clipvalue=None,
        adaptive_clipping=None,
        adaptive_clipping_eps=1e-3,
        centralize=False,
        conv_only=False,
        fan_in_axes=None,
        skip_nonfinite=False,
        max_consecutive_skips=None,
        layer_norms=None,
        **kwargs,
    ):
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model. Received: model={model!r} of type {type(model).__name__}")
        clipping = clipping_from_options(global_clipnorm, clipnorm, clipvalue, adaptive_clipping,
                                         adaptive_clipping_eps)
        chain = GradientChain(clipping, centralize=centralize, conv_only=conv_only, fan_in_axes=fan_in_axes)
        check_bool(skip_nonfinite, "skip_nonfinite")
        max_consecutive_skips = check_max_consecutive_skips(max_consecutive_skips, skip_nonfinite)
        layer_names = _layer_norm_names(model, layer_norms)
        kwargs.setdefault("dtype", model.dtype_policy)
        super().__init__(**kwargs)
        self.model = model
        self.gradient_chain = chain
        self.skip_nonfinite = skip_nonfinite
        self.layer_norms = layer_names
        self._telemetry = Telemetry(
            clips=clipping.option is not None, global_threshold=clipping.option == "global_clipnorm",
            skips=skip_nonfinite, layer_names=layer_names,
        )
        self._telemetry_metrics = self._telemetry.metrics
        self._skip_limit = SkipLimit(max_consecutive_skips)
        self._gradient_probe = None
        self._positions = None
        chain.clipping.build(self._add_state)
        if model.built:
            self.built = True

    def _add_state(self, name, shape, dtype, initializer):
        return self.add_weight(name=name, shape=shape, dtype=dtype, initializer=initializer, trainable=False,
                               aggregation="only_first_replica")

    @property
    def max_consecutive_skips(self):
        return self._skip_limit.limit

    def exclude_from_centralization(self, var_list=None, var_names=None):
        """Never centralize these variables (by variable, or by ``re.search`` on the name); before training.

        See :meth:`keras_gradops.pipeline.chain.GradientChain.exclude_from_centralization`.
        """
        self.gradient_chain.exclude_from_centralization(var_list, var_names)

    # -- inference: the wrapped model ------------------------------------------------

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def build(self, input_shape=None):
        # No weights of its own; the wrapped model builds itself on its first call.
        self.built = True

    def evaluate(self, *args, **kwargs):
        """As ``keras.Model.evaluate``, its results Python numbers on every Keras.

        Keras 3.10 to 3.13 return the test step's tensors when the step's log
        names differ from ``self.metrics`` (they do here: the telemetry metrics
        are left out of evaluation); Keras 3.14 and newer return Python numbers.
        """
        return tf.nest.map_structure(_python_number, super().evaluate(*args, **kwargs))

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """As ``keras.Model.export``: the inference function only (``serve``).

        ``input_signature`` defaults to the wrapped model's, so a wrapper that
        was never called (e.g. just loaded from ``.keras``) can be exported.
        """
        if input_signature is None:
            input_signature = keras_internals.input_signature(self.model)
        return super().export(filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs)

    # -- the train function and the skip limit ----------------------------------------------------

    def _check_jit_compile(self):
        strategy = self.distribute_strategy
        if not self.jit_compile or strategy.num_replicas_in_sync == 1:
            return
        if all(tf.DeviceSpec.from_string(d).device_type == "CPU" for d in strategy.extended.worker_devices):
            raise ValueError(
                f"`jit_compile=True` with {strategy.num_replicas_in_sync} replicas on CPU: XLA cannot compile "
                "the all-reduce between them on CPU devices (TensorFlow: 'Collectives are not yet implemented "
                "for CPU devices when compiling with XLA', plain Keras steps included). Compile with "
                "`jit_compile=False`, or leave the default, which Keras resolves to False under a strategy."
            )

    def _check_optimizer(self):
        optimizer = loss_scaling.updating_optimizer(self.optimizer)
        own = [f"{n}={getattr(optimizer, n)}" for n in CLIPPING_OPTIONS if getattr(optimizer, n, None)]
        if own and self.gradient_chain.clipping.option is not None:
            raise ValueError(
                f"Both the optimizer ({', '.join(own)}) and {type(self).__name__} clip the gradient. "
                "Set clipping on the wrapper only: it clips the aggregated gradient."
            )
        if own and not hasattr(optimizer, "transform_aggregated_gradients"):
            raise ValueError(
                f"The optimizer clips the gradient ({', '.join(own)}): Keras clips each replica's gradient "
                f"before summing them. Set the clipping on {type(self).__name__} instead "
                f"(e.g. {type(self).__name__}(model, {own[0]})): it clips the aggregated gradient."
            )

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        self._check_jit_compile()
        self._check_optimizer()
        self._positions = None  # the chain is built again for the trainable variables of this compile
        keras_internals.install_aggregation_hook(
            loss_scaling.updating_optimizer(self.optimizer), self._on_aggregated_gradients, owner=self,
        )
        super().make_train_function(force=force)
        if self.max_consecutive_skips is not None:
            step = self.train_function

            def step_then_check(iterator):
                logs = step(iterator)
                if self._skip_limit.reached(self):
                    self.stop_training = True
                return logs

            self.train_function = step_then_check
        return self.train_function

    # -- per-step gradient statistics for callbacks --------------------------------------------

    def watch_gradients(self, layers, stage="applied"):
        """Records each step's per-layer L2 norm and max ``|g|`` in a probe.

        Used by :class:`keras_gradops.callbacks.GradientStatsRecorder`. The
        train function is rebuilt so the next ``fit`` writes (or, after
        ``watch_gradients(None)``, stops writing) the probe.

        Args:
            layers: ``True``, a list of layer names or layers of ``self.model``,
                or ``None`` to stop recording.
            stage: ``"applied"`` (after clipping and centralization) or ``"raw"``.

        Returns:
            The :class:`~keras_gradops.training.gradient_probe.GradientProbe`, or ``None``.
        """
        probe = None
        if layers is not None:
            names = [layer.name for layer in resolve_layers(self.model, layers)]
            probe = GradientProbe(names, stage, self.distribute_strategy)
        self._gradient_probe = probe
        self.train_function = None
        return probe

    # -- serialization ------------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "model": keras.saving.serialize_keras_object(self.model),
            **self.gradient_chain.config(),
            "skip_nonfinite": self.skip_nonfinite,
            "max_consecutive_skips": self.max_consecutive_skips,
            "layer_norms": list(self.layer_norms) or None,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"), custom_objects=custom_objects)
        return cls(model, **config)


@keras.saving.register_keras_serializable(package="keras_gradops")
class GradientWrapperModel(GradientOpsModel):
    """Deprecated name of :class:`GradientOpsModel` (files saved under it still load)."""

    def __init__(self, *args, **kwargs):
        warnings.warn("`GradientWrapperModel` is deprecated: use `keras_gradops.GradientOpsModel`.",
                      DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)
