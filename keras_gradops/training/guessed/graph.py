"""The linear layers of any Keras model, where a guess goes while the model runs its own call.

A functional graph (residuals, attention), a keras_hub backbone (whose
blocks are subclassed layers) or a subclassed model cannot be run layer by
layer from outside; its linear layers can still be reached: while the
guessed step runs ``model(x)``, each :class:`LinearSite` layer's call is
replaced by one computing the same output, ``activation(s)`` with
``s = x K + b``, and doing the guess's work at ``s`` (see
:func:`keras_gradops.keras_internals.calls_replaced`).

A site is a ``Dense``, ``EinsumDense`` or (non-causal) ``Conv1D``/``Conv2D``/
``Conv3D`` layer with trainable weights, whichever they are: the kernel and
bias, LoRA's factors (after ``layer.enable_lora(rank)``: ``K = K_0 + A B
alpha / r`` with ``K_0`` frozen), or the bias alone. The layer's
pre-activation ``s`` is linear in each of them, and the weights' gradient for
a guess ``y`` of ``dL/ds`` is the pull-back of ``y`` through ``s`` alone (one
layer's vector-Jacobian product): for LoRA, ``g(B) = (alpha/r) (x A)^T y``
and ``g(A) = (alpha/r) x^T (y B^T)``.
"""

import keras
import tensorflow as tf

from keras_gradops.keras_internals import all_layers

_CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
SITE_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense, *_CONVOLUTIONS)


def is_linear_layer(layer):
    """Whether ``layer`` computes ``activation(x K + b)`` with a matmul, einsum or convolution this module runs."""
    if not isinstance(layer, SITE_LAYERS) or getattr(layer, "quantization_mode", None) is not None:
        return False
    return not (isinstance(layer, keras.layers.Conv1D) and layer.padding == "causal")


def linear_layers(model):
    """A :class:`LinearSite` for every linear layer of ``model`` (nested ones included), those with trainable
    weights first (their ``index`` numbers them from 0; the others' is ``None``)."""
    layers = [layer for layer in all_layers(model) if is_linear_layer(layer)]
    trained = [layer for layer in layers if layer.trainable_weights]
    return ([LinearSite(layer, index) for index, layer in enumerate(trained)]
            + [LinearSite(layer, None) for layer in layers if not layer.trainable_weights])


def activation_pull_back(activation, s, cotangent):
    """``J_act(s)^T cotangent`` for an elementwise activation: for ReLU ``cotangent * 1[s > 0]``."""
    if activation is keras.activations.linear:
        return cotangent
    if activation is keras.activations.relu:
        # One kernel, in place in ``cotangent``'s buffer: no mask tensor.
        return tf.raw_ops.ReluGrad(gradients=cotangent, features=tf.cast(s, cotangent.dtype))
    with tf.GradientTape() as tape:
        tape.watch(s)
        a = activation(s)
    return tape.gradient(a, s, output_gradients=cotangent)


def linear_map(layer, x, kernel, bias=None):
    """``x K + b`` of a linear ``layer`` for any ``K`` and ``b`` shaped as its own, in its compute dtype.

    Linear in ``x`` and in ``(K, b)``: also the forward derivative,
    ``linear_map(layer, t_x, K)`` along an input tangent,
    ``linear_map(layer, x, t_K, t_b)`` along a weight tangent.
    """
    dtype = layer.compute_dtype
    x = keras.ops.cast(x, dtype)
    kernel = keras.ops.cast(kernel, dtype)
    if isinstance(layer, keras.layers.Dense):
        s = keras.ops.matmul(x, kernel)
    elif isinstance(layer, keras.layers.EinsumDense):
        s = keras.ops.einsum(layer.equation, x, kernel)
    else:
        s = layer.convolution_op(x, kernel)
    if bias is None:
        return s
    bias = keras.ops.cast(bias, dtype)
    if isinstance(layer, _CONVOLUTIONS) and layer.data_format == "channels_first":
        bias = keras.ops.reshape(bias, (1, -1) + (1,) * layer.rank)
    return keras.ops.add(s, bias)


class LinearSite:
    """A linear layer of a model run by its own call: ``s = x K + b`` (matmul, einsum or convolution).

    Args:
        layer: a layer for which :func:`is_linear_layer` holds.
        index: its position among the model's sites with trainable weights
            (its stream of random draws), or ``None`` for a frozen layer.

    Attributes:
        variables: the layer's trainable weights, whose gradient the site guesses.
    """

    def __init__(self, layer, index):
        self.layer = layer
        self.index = index
        self.variables = list(layer.trainable_weights)

    def pre_activation(self, x):
        """``s``: the layer's output before its activation, with its current (LoRA-merged) kernel."""
        return self.linear(x, self.layer.kernel, self.layer.bias)

    def linear(self, x, kernel, bias=None):
        """:func:`linear_map` of this layer."""
        return linear_map(self.layer, x, kernel, bias)

    def activate(self, s):
        """The layer's output ``activation(s)``."""
        return self.layer.activation(s)

    def pull_back(self, s, cotangent):
        """``J_act(s)^T cotangent``."""
        return activation_pull_back(self.layer.activation, s, cotangent)

    def weight_update(self, x, cotangent):
        """The weights' gradient for a given ``dL/ds``: ``s``'s vector-Jacobian product in the weights alone.

        Returns:
            A list aligned with ``self.variables``, in their dtypes.
        """
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch([v.value for v in self.variables])
            s = self.pre_activation(tf.stop_gradient(x))
        grads = tape.gradient(s, [v.value for v in self.variables], output_gradients=tf.cast(cotangent, s.dtype))
        return [tf.cast(g, v.dtype) for g, v in zip(grads, self.variables)]
