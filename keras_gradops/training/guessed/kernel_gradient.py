"""A Dense kernel's gradient ``x^T c`` (``x``: the layer's input, ``c``: ``dL/ds``), in the faster layout.

``x`` is ``[B, I]`` and ``c`` is ``[B, O]``, both row-major, and the sum runs
over the batch, their major axis. TensorFlow's ``matmul(x, c,
transpose_a=True)`` (Keras' backprop computes the same) compiles under XLA on
CPU to a dot contracting ``x``'s major axis, and XLA folds every transpose
written around it back into that form. With few outputs (``O`` up to 128)
that dot runs at about half the rate of a row-major one: at ``B, I, O = 512,
3072, 128`` (the paper's first layer, "How to guess a gradient", Singhal et
al. 2023) 5.3 ms against 2.2 ms for ``c^T x`` with ``c^T`` stored
row-major. So under XLA such a kernel's gradient is computed as
``(c^T x)^T`` (3.1 ms): the two transposes are gathers of flat indices,
which XLA cannot fold into the dot; the indices wait for ``c``
(:func:`~keras_gradops.training.guessed.ordering.after`), else XLA folds
them into a constant as large as the kernel. From 256 outputs the gathers
(strided reads of the whole kernel) cost more than the dot saves
(``512, 1024, 1024``: 10.1 ms against 6.4 ms), and the plain matmul is kept.
``benchmarks/kernel_gradient_layouts.py`` measures both forms across
shapes. TensorFlow's executor (no XLA) keeps the plain matmul, which reads
``x`` transposed without copying it.
"""

import tensorflow as tf

from keras_gradops.keras_internals import compiled_by_xla
from keras_gradops.training.guessed.ordering import after

NARROW_OUTPUT = 128  # kernels with at most this many outputs: the transposed product is faster under XLA


def transposed_layout_pays(outputs):
    """Whether the gradient of a kernel with ``outputs`` outputs is faster as ``(c^T x)^T`` under XLA.

    A measured rule (``benchmarks/kernel_gradient_layouts.py``): across input
    widths 64-3072 and batches 512-8192, the output width decided.
    """
    return outputs <= NARROW_OUTPUT


def _transpose_by_gather(t, wait):
    """``t^T`` for a 2-D ``t``, as a gather of ``t``'s flat entries (``out[j, i] = t[i, j]``), after ``wait``."""
    rows, cols = tf.shape(t)[0], tf.shape(t)[1]
    (index,) = after([wait], [tf.range(cols)[:, None] + (tf.range(rows) * cols)[None, :]])
    return tf.gather(tf.reshape(t, [-1]), index)


def transposed_product(x, cotangent):
    """``(c^T x)^T`` for 2-D ``x`` ``[B, I]`` and ``c`` ``[B, O]``: ``x^T c`` from a row-major dot, under XLA.

    (Outside XLA the transposes are plain gathers; :func:`kernel_gradient` uses this under XLA only.)
    """
    product = tf.matmul(_transpose_by_gather(cotangent, cotangent), x)  # c^T x: [O, I]
    return tf.ensure_shape(_transpose_by_gather(product, cotangent), [x.shape[-1], cotangent.shape[-1]])


def kernel_gradient(x, cotangent):
    """``x^T c`` summed over every leading axis: ``[I, O]`` from ``x`` ``[..., I]`` and ``c`` ``[..., O]``.

    Args:
        x: the layer's input.
        cotangent: ``dL/ds``, shaped as the layer's pre-activation, in ``x``'s dtype.

    Returns:
        The kernel's gradient, ``[I, O]``.
    """
    inputs, outputs = x.shape[-1], cotangent.shape[-1]
    x = tf.reshape(x, [-1, inputs])
    cotangent = tf.reshape(cotangent, [-1, outputs])
    if not (compiled_by_xla() and transposed_layout_pays(outputs)):
        # The plain product; without XLA it reads x transposed in place (tensordot made a transposed copy of x).
        return tf.matmul(x, cotangent, transpose_a=True)
    return transposed_product(x, cotangent)
