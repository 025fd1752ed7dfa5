"""Stopping ``fit`` after too many skipped steps in a row."""

import warnings

import tensorflow as tf

from keras_gradops.arguments import check_positive_int


def check_max_consecutive_skips(value, skip_nonfinite):
    """``None`` or a positive int, which needs ``skip_nonfinite``."""
    value = check_positive_int(value, "max_consecutive_skips", allow_none=True)
    if value is not None and not skip_nonfinite:
        raise ValueError(
            "`max_consecutive_skips` counts skipped steps; it needs `skip_nonfinite=True`. "
            f"Received: skip_nonfinite=False, max_consecutive_skips={value}"
        )
    return value


class SkipLimit:
    """Counts consecutive skipped steps in a variable outside the model's weights.

    Args:
        limit: stop after this many (``None``: never).
    """

    def __init__(self, limit):
        self.limit = limit
        self.consecutive = tf.Variable(
            0, dtype=tf.int64, trainable=False,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA, name="consecutive_skips",
        )

    def record(self, applied):
        """In the train step: reset on an applied step, count a skipped one."""
        self.consecutive.assign(tf.where(applied, tf.constant(0, tf.int64), self.consecutive + 1))

    def reached(self, model):
        """After a train function call: ``True`` (and a warning) once the limit is reached."""
        count = int(self.consecutive.numpy())
        if self.limit is None or count < self.limit:
            return False
        warnings.warn(
            f"{type(model).__name__}: training stopped after {count} consecutive steps with "
            f"non-finite (NaN/Inf) gradients were skipped (max_consecutive_skips={self.limit}). "
            "Check the data for NaN/Inf, lower the learning rate or clip the gradients.",
            RuntimeWarning,
            stacklevel=3,
        )
        return True
