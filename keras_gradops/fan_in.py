"""Which axes of a Keras weight hold one output unit's incoming weights.

Gradient centralization and adaptive clipping work per output unit: one
neuron of a Dense layer, one filter of a convolution. Keras stores the
output unit on the LAST axis for Dense ``(in, out)``, Conv1D/2D/3D
``(*k, in, out)``, SeparableConv pointwise kernels and RNN kernels, so by
default the fan-in axes are all axes but the last. Some layers differ:

| layer | kernel layout | fan-in axes |
|---|---|---|
| Conv1D/2D/3DTranspose | ``(*k, out, in)`` | the spatial axes and the last |
| DepthwiseConv1D/2D, SeparableConv depthwise kernel | ``(*k, in, multiplier)`` | the spatial axes |
| EinsumDense (and so MultiHeadAttention) | from the equation | kernel axes absent from the output |
| Embedding | ``(vocab, dim)`` | none: rows have no incoming weights |
| LayerNormalization over several axes, PReLU | per-element scales | none |
| weights named ``bias`` (GRU: ``(2, 3 * units)``) or ``embeddings`` | | none, even unmapped |

A weight's fan-in axes can only be read from its layer. A wrapper model
reads them from the model it wraps (:func:`fan_in_axes`). An optimizer sees
only variables, and a Keras variable does not point to its layer, so
:func:`unit_axes` looks for the layer among the live Keras layers of the
process when the optimizer is built: a ``Conv2DTranspose`` kernel gets its
own axes without a mapping, whatever the layer is named. A mapping passed as
``fan_in_axes=...`` comes first. A mapping value of ``None`` means "this
weight has no per-unit fan-in": it is never centralized, and adaptive
clipping treats it as a single unit, like a rank-1 bias. A layer class of
your own is read as Keras' convention (output last) unless mapped.

Keys are ``variable.path``. Keras renames the outer scope of a path when a
model is loaded or cloned (a ``Sequential``'s ``sequential/conv/kernel`` is
``conv/kernel`` after ``keras.saving.load_model``), so a key also matches a
variable whose path ends with it, or that it ends with, at a ``/``.
"""

import gc

import keras

from keras_gradops import keras_internals


def default_fan_in_axes(rank):
    """All axes but the last: ``(0, ..., rank - 2)``; ``()`` for rank <= 1."""
    return tuple(range(max(rank - 1, 0)))


def _transpose_conv_axes(kernel):
    rank = len(kernel.shape)
    return tuple(a for a in range(rank) if a != rank - 2)


def _spatial_axes(kernel):
    return tuple(range(len(kernel.shape) - 2))


def _einsum_axes(layer):
    inputs, output = layer.equation.split("->")
    kernel_spec = inputs.split(",")[1].replace("...", "")
    output = output.replace("...", "")
    return tuple(i for i, letter in enumerate(kernel_spec) if letter not in output)


NO_FAN_IN_NAMES = ("bias", "embeddings")
"""Weights with these names have no incoming weights, whatever their rank:
Keras stores the GRU bias as ``(2, 3 * units)``, EinsumDense (so
MultiHeadAttention) biases as e.g. ``(heads, key_dim)``, and an Embedding
table as ``(vocab, dim)`` (its gradient is dense once L2 decay is added)."""


def _layer_rules(layer):
    """(attribute name, fan-in axes or None) pairs for one layer's own weights."""
    layers = keras.layers
    if isinstance(layer, layers.LayerNormalization):
        return [("gamma", None), ("beta", None)]
    if isinstance(layer, layers.PReLU):
        return [("alpha", None)]
    if isinstance(layer, (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)):
        return [("kernel", _transpose_conv_axes(layer.kernel))]
    if isinstance(layer, (layers.DepthwiseConv1D, layers.DepthwiseConv2D)):
        return [("kernel", _spatial_axes(layer.kernel))]
    if isinstance(layer, (layers.SeparableConv1D, layers.SeparableConv2D)):
        return [("depthwise_kernel", _spatial_axes(layer.depthwise_kernel))]
    if isinstance(layer, layers.EinsumDense):
        return [("kernel", _einsum_axes(layer))]
    if isinstance(layer, layers.Embedding):
        return [("embeddings", None)]
    return []


def fan_in_axes(model):
    """Maps the path of every weight whose fan-in is not "all axes but the last".

    Args:
        model: a built ``keras.Model`` or ``keras.layers.Layer``.

    Returns:
        ``dict`` from ``variable.path`` to a tuple of axes, or to ``None`` for
        weights that have no per-unit fan-in (``Embedding``, multi-axis
        ``LayerNormalization``, ``PReLU``). Weights absent from the mapping
        use :func:`resolve_fan_in_axes`' default.

    Raises:
        TypeError: ``model`` is not a Keras layer or model.
        ValueError: ``model`` is not built.

    Example:
        >>> layer = keras.layers.Conv2DTranspose(8, 3)
        >>> layer.build((None, 5, 5, 4))
        >>> list(fan_in_axes(layer).values())
        [(0, 1, 3)]
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"`model` must be a Keras model or layer. Received: model={model!r}")
    if not model.built:
        raise ValueError(
            f"`model` must be built before its fan-in axes can be read. Call it on "
            f"data or `model.build(input_shape)` first. Received unbuilt: {model.name}"
        )
    mapping = {}
    for layer in keras_internals.all_layers(model, include_self=True):
        for attribute, axes in _layer_rules(layer):
            weight = getattr(layer, attribute, None)
            if weight is not None:
                mapping[weight.path] = axes
    return mapping


def _mapping_entry(mapping, path):
    """``(found, axes)`` for ``path``: its own key, else keys equal up to an outer scope."""
    if path in mapping:
        return True, mapping[path]
    matches = {
        key: axes for key, axes in mapping.items()
        if key.endswith("/" + path) or path.endswith("/" + key)
    }
    values = {None if axes is None else tuple(axes) for axes in matches.values()}
    if len(values) > 1:
        raise ValueError(
            f"`fan_in_axes` has several entries for variable `{path}` with different axes: "
            f"{matches}. Key the mapping by the variable's full path."
        )
    if not values:
        return False, None
    return True, values.pop()


def resolve_fan_in_axes(variable, mapping=None):
    """The fan-in axes of ``variable``: its entry in ``mapping``, else ``None``
    for a weight named in :data:`NO_FAN_IN_NAMES`, else :func:`default_fan_in_axes`.

    Raises:
        ValueError: several ``mapping`` keys match ``variable`` with different axes.
    """
    if mapping:
        found, axes = _mapping_entry(mapping, variable.path)
        if found:
            return None if axes is None else tuple(axes)
    if variable.name in NO_FAN_IN_NAMES:
        return None
    return default_fan_in_axes(len(variable.shape))


def _layer_axes_by_variable(layers):
    """``{id(weight): axes or None}`` for the weights the layer rules above describe."""
    found = {}
    for layer in layers:
        for attribute, axes in _layer_rules(layer):
            weight = getattr(layer, attribute, None)
            if weight is not None:
                found[id(weight)] = axes
    return found


def _live_layers():
    """Every Keras layer alive in this process (read once per optimizer build, ~0.1 s)."""
    return [obj for obj in gc.get_objects() if isinstance(obj, keras.layers.Layer)]


def unit_axes(variables, mapping=None, model=None):
    """The fan-in axes of each variable, or ``None`` for a weight without a per-unit fan-in.

    In order: the variable's entry in ``mapping``; the rule of its layer
    (found in ``model``, or among the live layers of the process when no
    model is given); ``None`` for weights named in :data:`NO_FAN_IN_NAMES`;
    else :func:`default_fan_in_axes`.

    Raises:
        ValueError: an axis in ``mapping`` is not an axis of its variable, or
            several keys match a variable with different axes.
    """
    needs_layers = [v for v in variables if not (mapping and _mapping_entry(mapping, v.path)[0])]
    by_layer = {}
    if needs_layers and any(len(v.shape) > 1 for v in needs_layers):
        layers = keras_internals.all_layers(model, include_self=True) if model is not None else _live_layers()
        by_layer = _layer_axes_by_variable(layers)
    resolved = []
    for variable in variables:
        rank = len(variable.shape)
        found, axes = _mapping_entry(mapping, variable.path) if mapping else (False, None)
        if found and axes is not None and any(a >= rank for a in axes):
            raise ValueError(
                f"`fan_in_axes` maps variable `{variable.path}` of shape {tuple(variable.shape)} to axes "
                f"{tuple(axes)}, beyond its rank {rank}. Build the mapping with "
                "`fan_in_axes=kgo.fan_in_axes(model)`."
            )
        if not found and id(variable) in by_layer:
            found, axes = True, by_layer[id(variable)]
        if not found:
            axes = None if variable.name in NO_FAN_IN_NAMES else default_fan_in_axes(rank)
        resolved.append(None if axes is None else tuple(axes))
    return resolved
