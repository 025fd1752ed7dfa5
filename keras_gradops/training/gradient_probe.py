"""The last step's per-layer gradient statistics, readable from Python.

Telemetry in the fit logs is an epoch mean; a plot of the gradient over
iterations needs each step's value. A :class:`GradientProbe` holds them in one
variable that the train step writes and a callback reads. It is a plain
object, so the variable is neither a model weight nor saved nor exported.
"""

import tensorflow as tf

from keras_gradops.training.layer_groups import group_max_abs, group_norms

STAGES = ("applied", "raw")


class GradientProbe:
    """Per-layer ``[L2 norm, max |g|]`` of the last step's gradient.

    Args:
        layer_names: the names of the watched layers, in order.
        stage: ``"applied"`` records the gradient the optimizer receives
            (after clipping and centralization), ``"raw"`` the aggregated
            gradient before any op.
        strategy: the ``tf.distribute`` strategy the model runs under.
    """

    def __init__(self, layer_names, stage, strategy):
        if stage not in STAGES:
            raise ValueError(f"`stage` must be one of {STAGES}. Received: stage={stage!r}")
        self.layer_names = tuple(layer_names)
        self.stage = stage
        with strategy.scope():
            self.values = tf.Variable(
                tf.zeros([len(self.layer_names), 2]), trainable=False,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA, name="gradient_probe",
            )

    def record(self, gradients, groups):
        """Writes each group's L2 norm and max ``|g|``."""
        self.values.assign(tf.stack([group_norms(gradients, groups), group_max_abs(gradients, groups)], axis=1))

    def record_skipped(self):
        """A skipped step: NaN statistics (its gradient never reached the optimizer)."""
        self.values.assign(tf.fill(tf.shape(self.values), float("nan")))

    def read(self):
        """A NumPy ``(n_layers, 2)`` array: columns L2 norm and max ``|g|``."""
        return self.values.numpy()
