"""Seeded random draws: every draw of a step is a function of one ``[2]`` seed.

Stateless random ops with seeds computed at run time (never constants, which
Grappler would fold) give the same numbers when a forward pass is recomputed,
and let a test rebuild a guess from the seed. (XLA's kernels turn the same
seed into other numbers than TensorFlow's own: a guess is reproducible within
one mode.) The algorithm is Philox: left to ``auto_select``, XLA on CPU picks
ThreeFry, about 50 times slower here.

Two distributions, both with mean 0 and covariance ``I``, so every guess keeps
its expectation (unbiased methods stay unbiased):

- ``"normal"``: ``N(0, 1)``, the paper's choice (Singhal et al., arXiv 2312.04709).
- ``"rademacher"``: ``+1`` or ``-1`` with probability 1/2 each, 32 signs from
  each random 32-bit word: about 8 times cheaper to draw than normals, and a
  directional derivative's variance is lower (fourth moment 1, not 3; the
  forward-gradient paper, Baydin et al. 2022, allows any such distribution).
"""

import tensorflow as tf

from keras_gradops.training.guessed.ordering import after as wait_for

NORMAL = "normal"
RADEMACHER = "rademacher"
DISTRIBUTIONS = (NORMAL, RADEMACHER)
DEFAULT = NORMAL
_ALGORITHM = "philox"
_BITS = 32


def fold_in(seed, *indices):
    """A new ``[2]`` seed from ``seed`` and integer indices (``stateless_fold_in`` in turn)."""
    for index in indices:
        seed = tf.random.experimental.stateless_fold_in(seed, index, alg=_ALGORITHM)
    return seed


def seed_table(seed, count):
    """``count`` independent ``[2]`` seeds from ``seed`` in one draw: a ``[count, 2]`` int64 tensor.

    One random op for every seed of a step, not a chain of ``fold_in`` per
    draw: XLA compiles each random op into a few hundred instructions.
    """
    return tf.random.stateless_uniform([count, 2], seed=seed, minval=None, maxval=None, dtype=tf.int64,
                                       alg=_ALGORITHM)


def as_seed(seed):
    """An int64 ``[2]`` seed tensor from an int, a pair or a ``[2]`` tensor."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        seed = [seed, 0]
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    if seed.shape.rank != 1 or seed.shape[0] != 2:
        raise ValueError(f"`seed` must be an int or a pair of ints. Received: seed={seed!r}")
    return seed


def _rademacher(seed, shape, dtype):
    """Bit ``k`` of a random word picks the sign: a bool mask, then one full-size float tensor."""
    size = tf.reduce_prod(tf.cast(shape, tf.int32))
    words = tf.random.stateless_uniform(
        [(size + _BITS - 1) // _BITS], seed=seed, minval=None, maxval=None, dtype=tf.int32, alg=_ALGORITHM
    )
    bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(words[:, None], tf.range(_BITS, dtype=tf.int32)), 1)
    signs = tf.where(tf.cast(bits, tf.bool), tf.constant(1, dtype), tf.constant(-1, dtype))
    return tf.reshape(tf.reshape(signs, [-1])[:size], shape)


def draw(distribution, seed, shape, dtype, after=None):
    """Draws of ``distribution`` (mean 0, variance 1), made only once the tensors in ``after`` exist.

    The seed waits for ``after``, which keeps the executor (or XLA's
    scheduler) from drawing every layer's noise at the start of the step,
    which would hold it all in memory.

    Args:
        distribution: ``"normal"`` or ``"rademacher"``.
        seed: an int64 ``[2]`` seed tensor.
        shape: the shape of the draw (a list or a 1-D int tensor).
        dtype: a floating dtype.
        after: tensors that must be computed first.
    """
    if after:
        (seed,) = wait_for(after, [seed])
    if distribution == RADEMACHER:
        return _rademacher(seed, shape, dtype)
    return tf.random.stateless_normal(shape, seed=seed, dtype=dtype, alg=_ALGORITHM)
