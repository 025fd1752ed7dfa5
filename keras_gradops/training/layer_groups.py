"""Per-layer views of a gradient list: which gradients belong to which layer."""

import keras
import tensorflow as tf

from keras_gradops import keras_internals
from keras_gradops.ops import global_norm
from keras_gradops.ops._dtypes import to_float32, values_of


def resolve_layers(model, layers):
    """The layers of ``model`` named by ``layers``.

    Args:
        model: a Keras model.
        layers: ``True`` for every top-level layer that has trainable weights,
            or a list of layer names (searched recursively) or layer objects.

    Returns:
        A list of layers.

    Raises:
        ValueError: a name matches no layer, or a layer has no trainable weights.
        TypeError: ``layers`` is neither ``True`` nor a list of names/layers.
    """
    if layers is True:
        return [layer for layer in model.layers if layer.trainable_weights]
    if isinstance(layers, (str, keras.layers.Layer)) or not isinstance(layers, (list, tuple)):
        raise TypeError(
            "`layers` must be True or a list of layer names or layers. "
            f"Received: layers={layers!r}"
        )
    by_name = {layer.name: layer for layer in keras_internals.all_layers(model)}
    resolved = []
    for entry in layers:
        if isinstance(entry, keras.layers.Layer):
            layer = entry
        elif isinstance(entry, str) and entry in by_name:
            layer = by_name[entry]
        else:
            raise ValueError(
                f"No layer {entry!r} in model {model.name!r}. Layers: {sorted(by_name)}"
            )
        if not layer.trainable_weights:
            raise ValueError(f"Layer {layer.name!r} has no trainable weights, hence no gradient.")
        resolved.append(layer)
    return resolved


def variable_groups(layers, variables):
    """For each layer, the indices in ``variables`` of its trainable weights."""
    position = {id(v): i for i, v in enumerate(variables)}
    return [[position[id(v)] for v in layer.trainable_weights if id(v) in position] for layer in layers]


def group_norms(gradients, groups):
    """The L2 norm of each group's gradients, float32."""
    return [global_norm([gradients[i] for i in group]) for group in groups]


def group_max_abs(gradients, groups):
    """The largest ``|g|`` entry of each group's gradients, float32."""
    maxima = []
    for group in groups:
        present = [to_float32(values_of(gradients[i])) for i in group if gradients[i] is not None]
        if not present:
            maxima.append(tf.constant(0.0))
            continue
        maxima.append(tf.reduce_max(tf.stack([tf.reduce_max(tf.abs(g)) for g in present])))
    return maxima
