"""Gradient centralization (GC).

Yong, Huang, Hua & Zhang, "Gradient Centralization: A New Optimization
Technique for Deep Neural Networks", ECCV 2020 (arXiv:2004.01461).

For the incoming weights ``w_i`` of one output unit, GC subtracts the mean of
their gradient: ``Phi_GC(g_i) = g_i - mean(g_i)``, the projection of the
gradient onto the hyperplane ``e^T (w - w_t) = 0``.
"""

import tensorflow as tf

from keras_gradops.fan_in import resolve_fan_in_axes
from keras_gradops.ops._dtypes import to_float32
from keras_gradops.pipeline.centralization import CentralizationSelection


def centralize(gradient, axes):
    """``g - mean(g, axes)``: subtracts the per-output-unit mean of a gradient.

    Args:
        gradient: a dense tensor, a ``tf.IndexedSlices`` or ``None``.
        axes: the fan-in axes to average over (see :mod:`keras_gradops.fan_in`).

    Returns:
        The centralized gradient in the input dtype (float16/bfloat16 averaged
        in float32). ``None`` and ``tf.IndexedSlices`` come back unchanged: a
        sparse gradient is never densified nor centralized.

    Example:
        >>> centralize(tf.constant([[1.0, 2.0], [3.0, 6.0]]), axes=(0,)).numpy().tolist()
        [[-1.0, -2.0], [1.0, 2.0]]
    """
    if gradient is None or isinstance(gradient, tf.IndexedSlices) or not axes:
        return gradient
    values = to_float32(gradient)
    centered = values - tf.reduce_mean(values, axis=list(axes), keepdims=True)
    return tf.cast(centered, gradient.dtype)


def centralization_axes(variable, conv_only=False, fan_in_axes=None):
    """The axes ``variable``'s gradient is centralized over, or ``None`` for none.

    Rank-1 variables (biases, normalisation scales) and weights named
    ``bias`` or ``embeddings`` (Keras' GRU and EinsumDense biases have rank 2)
    are never centralized; with ``conv_only`` neither is anything of rank
    below 4. A unit whose fan-in holds a single weight is left alone:
    centralizing it would zero its gradient. ``fan_in_axes`` overrides the
    layout per variable path; a ``None`` entry excludes the variable. (See
    :mod:`keras_gradops.pipeline.centralization` for the rules.)
    """
    return CentralizationSelection(conv_only).axes(variable, resolve_fan_in_axes(variable, fan_in_axes))


def centralize_gradients(gradients, variables, conv_only=False, fan_in_axes=None):
    """Centralizes each gradient over its variable's fan-in axes.

    Args:
        gradients: list of tensors, ``tf.IndexedSlices`` or ``None``.
        variables: the variables, aligned with ``gradients``.
        conv_only: only centralize convolution kernels (rank >= 4), as the
            reference ``GCC`` optimizers.
        fan_in_axes: optional ``{variable.path: axes or None}`` overrides, e.g.
            from :func:`keras_gradops.fan_in_axes`.

    Returns:
        The list of gradients, centralized where that applies.
    """
    if len(gradients) != len(variables):
        raise ValueError(
            f"`gradients` and `variables` must align one to one. Received "
            f"{len(gradients)} gradients and {len(variables)} variables."
        )
    return [
        centralize(g, centralization_axes(v, conv_only, fan_in_axes))
        for g, v in zip(gradients, variables)
    ]
