"""Execution order of a guessed step, held both under XLA and without it.

A guessed step keeps activation memory ``O(1)`` in depth only if it runs in
a set order: each layer of the forward pass waits for the previous layer's
tangent, a random draw waits for the layer that uses it, the recomputing
pass starts once every directional derivative is known, and each layer of it
waits for the previous layer's update. Two runtimes need two mechanisms:

- TensorFlow's executor runs an op as soon as its inputs exist: a control
  dependency makes a value wait (an ``Identity`` with control inputs, which
  Grappler keeps).
- XLA drops control dependencies, schedules the whole program by its own
  memory heuristics (which ran every forward layer before the first
  tangent) and merges identical computations (common-subexpression
  elimination), which would fold a recomputed layer back into the first
  pass and keep it alive. Its optimization barrier does not help on CPU:
  XLA removes it before the late CSE and the scheduler. A data dependency
  does both jobs: the value becomes ``value + 0 * w``, ``w`` read from an
  element of each tensor waited for (``0`` where that is not finite, so
  nothing but the order changes). XLA folds ``0 * w`` for integers only,
  so the sum is a new value it must compute after ``w`` and cannot merge
  with the computation on ``value`` before; the add fuses into the op that
  makes ``value``.

TensorFlow has no public test for "is this function being compiled by XLA"
(TF 2.21): :func:`keras_gradops.keras_internals.compiled_by_xla` reads the
private one, and fails with a clear error if a TensorFlow version moves it.
"""

import tensorflow as tf

from keras_gradops.keras_internals import compiled_by_xla
from keras_gradops.training.guessed.shared_function import shared_function


@shared_function
def _zero_after(waits):
    """A float32 zero that XLA can compute only once every tensor in ``waits`` is, and cannot fold.

    A shared function: the step calls it about six times a layer, and its
    ten ops were a third of a 16-layer step's traced program.
    """
    first = tf.add_n([tf.cast(tf.reshape(w, [-1])[0], tf.float32) for w in waits])
    return tf.where(tf.math.is_finite(first), first, 0.0) * 0.0


def after(waits, values):
    """``values``, available only once every tensor in ``waits`` (``None`` skipped) is computed.

    Under XLA the returned tensors are also new to it: a computation on them
    is never merged with the same computation on ``values`` before.

    Args:
        waits: tensors (or ``None``) to compute first.
        values: tensors to pass on.

    Returns:
        A list of tensors equal to ``values``.
    """
    waits = [w for w in waits if w is not None]
    values = list(values)
    if not waits:
        return values
    if compiled_by_xla():
        zero = _zero_after(waits)
        return [v + tf.cast(zero, v.dtype) for v in values]
    with tf.control_dependencies(waits):
        return [tf.identity(v) for v in values]


def executor_after(waits, values):
    """:func:`after` for TensorFlow's executor only: under XLA, ``values`` unchanged.

    For an order XLA's memory-aware scheduler already keeps, where a data
    dependency would only give it one more value to hold.
    """
    return list(values) if compiled_by_xla() else after(waits, values)
