"""Seeded random draws: every draw of a step is a function of one ``[2]`` seed.

Stateless random ops with seeds computed at run time (never constants, which
Grappler would fold) give the same numbers when a forward pass is recomputed,
and let a test rebuild a guess from the seed. (XLA's kernels turn the same
seed into other numbers than TensorFlow's own: a guess is reproducible within
one mode.) The algorithm is Philox: left to ``auto_select``, XLA on CPU picks
ThreeFry, about 50 times slower here.
"""

import tensorflow as tf

SITE_STREAM = 0
VARIABLE_STREAM = 1
_ALGORITHM = "philox"


def fold_in(seed, *indices):
    """A new ``[2]`` seed from ``seed`` and integer indices (``stateless_fold_in`` in turn)."""
    for index in indices:
        seed = tf.random.experimental.stateless_fold_in(seed, index, alg=_ALGORITHM)
    return seed


def as_seed(seed):
    """An int64 ``[2]`` seed tensor from an int, a pair or a ``[2]`` tensor."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        seed = [seed, 0]
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    if seed.shape.rank != 1 or seed.shape[0] != 2:
        raise ValueError(f"`seed` must be an int or a pair of ints. Received: seed={seed!r}")
    return seed


def normal(seed, shape, dtype, after=None):
    """``N(0, 1)`` draws, made only once the tensors in ``after`` exist.

    The control dependency keeps the executor from drawing every layer's
    noise at the start of the step, which would hold it all in memory.
    """
    with tf.control_dependencies(after or []):
        return tf.random.stateless_normal(shape, seed=seed, dtype=dtype, alg=_ALGORITHM)
