"""Seeded random draws: every draw of a step is a function of one ``[2]`` seed.

Stateless random ops with seeds computed at run time (never constants, which
Grappler would fold) give the same numbers when a forward pass is recomputed,
and let a test rebuild a guess from the seed. (XLA's kernels turn the same
seed into other numbers than TensorFlow's own: a guess is reproducible within
one mode.) Seeds and normal draws use Philox: left to ``auto_select``, XLA on
CPU picks ThreeFry, about 50 times slower here. A normal draw's ``[2]`` seed
is Philox's key and the high word of its counter as they are; TensorFlow's
``tf.random.stateless_*`` would first scramble every seed with one more
Philox op, which :func:`seed_table` does once for all the seeds of a step.
Signs come from SplitMix64 words keyed by the seed (:func:`_rademacher_signs`).

Two distributions, both with mean 0 and covariance ``I``, so every guess keeps
its expectation (unbiased methods stay unbiased):

- ``"normal"``: ``N(0, 1)``, the paper's choice (Singhal et al., arXiv 2312.04709).
- ``"rademacher"``: ``+1`` or ``-1`` with probability 1/2 each, 64 signs from
  each random 64-bit word: far cheaper to draw than normals, and a
  directional derivative's variance is lower (fourth moment 1, not 3; the
  forward-gradient paper, Baydin et al. 2022, allows any such distribution).
"""

import numpy as np
import tensorflow as tf

from keras_gradops.training.guessed.ordering import after as wait_for
from keras_gradops.training.guessed.shared_function import shared_function

NORMAL = "normal"
RADEMACHER = "rademacher"
DISTRIBUTIONS = (NORMAL, RADEMACHER)
DEFAULT = RADEMACHER
_ALGORITHM = "philox"
_PHILOX = tf.random.Algorithm.PHILOX.value


def fold_in(seed, *indices):
    """A new ``[2]`` seed from ``seed`` and integer indices (``stateless_fold_in`` in turn)."""
    for index in indices:
        seed = tf.random.experimental.stateless_fold_in(seed, index, alg=_ALGORITHM)
    return seed


def sequence_seed(seed, index):
    """The seed of draw ``index`` of a sequence made from one ``[2]`` seed: ``seed + [0, index]``.

    One addition where :func:`fold_in` is a random op (a few hundred XLA
    instructions wherever it is inlined). ``seed[1]`` is the high word of
    Philox's counter for a normal draw, so the sequence's draws read disjoint
    stretches of one Philox stream; for signs it gives each draw its own
    SplitMix64 key.
    """
    return seed + tf.cast(tf.stack([0, index]), seed.dtype)


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


def _key_counter(seed):
    """Philox's key (``seed[0]``) and 128-bit counter (high word ``seed[1]``, low word 0) of a draw."""
    seed = tf.bitcast(tf.cast(seed, tf.int64), tf.uint64)
    return seed[:1], tf.stack([tf.zeros([], tf.uint64), seed[1]])


_WEYL = 0x9E3779B97F4A7C15  # SplitMix64's increment, 2**64 / golden ratio
_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_SIGNS_PER_WORD = 64


def _splitmix64(z):
    """SplitMix64's output function (Steele, Lea and Flood, OOPSLA 2014) on ``uint64`` tensors."""
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(30, tf.uint64))) * tf.constant(_MIX[0], tf.uint64)
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(27, tf.uint64))) * tf.constant(_MIX[1], tf.uint64)
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(31, tf.uint64)))


@shared_function
def _rademacher_signs(seed, size, dtype):
    """``size`` signs from SplitMix64 words: bit ``k`` of word ``i`` is sign ``64 i + k``, a flat tensor.

    Word ``i`` is ``splitmix64(key + (i + 1) * WEYL)``, SplitMix64's stream
    from state ``key = splitmix64(seed[0] + splitmix64(seed[1] + WEYL))``
    (seeds come from Philox, :func:`seed_table`). A Philox draw compiles to
    about 400 XLA instructions, and the guessed step makes one or two per
    layer: the compiled program, and the memory XLA needs to compile it,
    grew with depth ~20 times faster than Keras' own step. SplitMix64 is a
    dozen instructions a word and passes BigCrush; 64 signs per word.

    Traced once per dtype, runtime and static size, and called by every
    draw: a draw adds one call to the step's traced program, not the fifty
    ops written here (tracing memory grows with the program), and without
    XLA one shared instance runs every call
    (:mod:`~keras_gradops.training.guessed.shared_function`).
    Without XLA the temporaries are the words and their octets (half a
    byte a sign), an eighth of a float32 output.

    ``size`` is a Python int when it is known as the step is traced, else a
    run-time int64 tensor: a constant tensor input
    (a weight's static size) would give each call its own copy of the
    function (Grappler's function specialization pushes constants into a
    copy per call site), which the shared instance is there to avoid.
    """
    seed = tf.bitcast(seed, tf.uint64)
    weyl = tf.constant(_WEYL, tf.uint64)
    key = _splitmix64(seed[0] + _splitmix64(seed[1] + weyl))
    count = (size + _SIGNS_PER_WORD - 1) // _SIGNS_PER_WORD
    index = tf.cast(tf.range(1, count + 1, dtype=tf.int64), tf.uint64)
    words = _splitmix64(key + index * weyl)
    # XLA would fuse the words into the signs and recompute each word for each of its 64 signs. Its
    # fusion pass does not duplicate an integer division by a run-time value, so the words are divided
    # by a 1 it cannot see: each word is then computed once.
    one = tf.bitcast(tf.cast(1.0 + tf.cast(seed[1] % 2, tf.float32) * 0.0, tf.int64), tf.uint64)
    words = words // one
    octets = tf.cast(tf.bitcast(words, tf.uint8), tf.int32)  # [words, 8], in little-endian order
    signs = tf.gather(_octet_signs(dtype), octets)  # [words, 8, 8]: sign 8 j + k is bit k of octet j
    return tf.reshape(signs, [-1])[:size]


def _octet_signs(dtype):
    """``[256, 8]``: row ``v`` holds ``2 * bit_k(v) - 1`` for ``k = 0..7``, the signs of octet value ``v``.

    One gather per octet writes its eight signs in ``dtype`` directly;
    shifting, masking and casting made three tensors as large as the signs
    (one byte each) or larger before them (no fusion without XLA).
    """
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1
    return tf.constant(2 * bits - 1, dtype)


def _size(shape):
    """The number of elements of a draw shaped ``shape``: an int if known when traced, else an int64 tensor."""
    static = tf.get_static_value(shape) if isinstance(shape, tf.Tensor) else shape
    if static is not None:
        return int(np.prod(static, dtype=np.int64))
    return tf.reduce_prod(tf.cast(shape, tf.int64))


def draw(distribution, seed, shape, dtype, after=None):
    """Draws of ``distribution`` (mean 0, variance 1), made only once the tensors in ``after`` exist.

    The seed waits for ``after``, which keeps the executor (or XLA's
    scheduler) from drawing every layer's noise at the start of the step,
    which would hold it all in memory.

    Args:
        distribution: ``"normal"`` or ``"rademacher"``.
        seed: an int64 ``[2]`` seed tensor: Philox's key and the high word of
            its counter (a row of :func:`seed_table`).
        shape: the shape of the draw (a list or a 1-D int tensor).
        dtype: a floating dtype.
        after: tensors that must be computed first.
    """
    if after:
        (seed,) = wait_for(after, [seed])
    if distribution == RADEMACHER:
        return tf.reshape(_rademacher_signs(tf.cast(seed, tf.int64), _size(shape), tf.as_dtype(dtype)), shape)
    key, counter = _key_counter(seed)
    return tf.raw_ops.StatelessRandomNormalV2(
        shape=tf.cast(shape, tf.int32) if isinstance(shape, tf.Tensor) else shape, key=key, counter=counter,
        alg=_PHILOX, dtype=dtype)
