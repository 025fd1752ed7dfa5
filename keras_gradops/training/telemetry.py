"""The gradient logs of a wrapper model's train step, as Keras metrics.

Metrics, not returned values, so the fit logs, ``History``, the progress bar
and ``keras.callbacks.TensorBoard`` get epoch means (a value returned from
``train_step`` that is not a metric shows the last batch only):

| log | meaning |
|---|---|
| ``grad_norm`` | mean pre-clip global norm of the aggregated gradient, over applied steps |
| ``clipped_fraction`` | share of applied steps the clipping changed (with a clipping option) |
| ``clip_threshold`` | mean global-norm threshold in force (with ``global_clipnorm``) |
| ``skipped_steps`` | number of skipped non-finite steps (with ``skip_nonfinite``) |
| ``grad_norm/<layer>`` | mean pre-clip norm of a layer's gradient (``layer_norms``) |
"""

import keras
import tensorflow as tf

from keras_gradops import replicas
from keras_gradops.training.layer_groups import group_norms


class Telemetry:
    """The metrics above, and their updates.

    Args:
        clips: whether a clipping option is set.
        global_threshold: whether the clipping is by global norm.
        skips: whether non-finite steps are skipped.
        layer_names: layers whose gradient norm is logged.
    """

    def __init__(self, clips, global_threshold, skips, layer_names):
        self.grad_norm = keras.metrics.Mean(name="grad_norm")
        self.clipped_fraction = keras.metrics.Mean(name="clipped_fraction") if clips else None
        self.clip_threshold = keras.metrics.Mean(name="clip_threshold") if global_threshold else None
        self.skipped_steps = keras.metrics.Sum(name="skipped_steps") if skips else None
        self.layer_norms = [keras.metrics.Mean(name=f"grad_norm/{name}") for name in layer_names]

    @property
    def metrics(self):
        """Every metric, for the model to track (and reset each epoch)."""
        optional = [self.clipped_fraction, self.clip_threshold, self.skipped_steps]
        return [self.grad_norm] + [m for m in optional if m is not None] + self.layer_norms

    @property
    def names(self):
        return {m.name for m in self.metrics}

    def record_step(self, statistics, gradients, layer_groups):
        """An applied step: its :class:`~keras_gradops.pipeline.chain.StepStatistics` and
        the aggregated gradient before the chain (aligned with the variables; ``None`` kept)."""
        self.grad_norm.update_state(statistics.norm)
        if self.clipped_fraction is not None:
            self.clipped_fraction.update_state(tf.cast(statistics.clipped, "float32"))
        if self.clip_threshold is not None:
            self.clip_threshold.update_state(statistics.threshold)
        for metric, norm in zip(self.layer_norms, group_norms(gradients, layer_groups)):
            metric.update_state(norm)

    def record_skip(self, applied):
        """Counts a skipped step once, however many replicas run (``applied`` is the same on all)."""
        if self.skipped_steps is None:
            return
        counted_once = tf.logical_and(tf.logical_not(applied), replicas.is_first_replica())
        self.skipped_steps.update_state(tf.cast(counted_once, "float32"))
