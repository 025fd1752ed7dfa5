"""Fan-in axes per Keras layer, and the gradient that really reaches the update.

The end-to-end check uses ``SGDGC(learning_rate=1)`` without momentum: the
weight change is minus the transformed gradient, so it must equal
``-(g - mean(g))`` over each output unit's fan-in, with the axes written down
here by hand from each layer's kernel layout (not read from the package).
"""

import doctest

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_gradops as kgo
from keras_gradops import fan_in

L = keras.layers


def np_centralize(g, axes):
    return g - g.mean(axis=tuple(axes), keepdims=True)


def _model(input_shape, *layers, dtype="float32"):
    inputs = keras.Input(input_shape, dtype=dtype)
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x)


def _mha_model():
    inputs = keras.Input((4, 6))
    return keras.Model(inputs, L.MultiHeadAttention(num_heads=2, key_dim=3)(inputs, inputs))


# case: (model factory, input maker, {variable "parent/name" or "name": expected fan-in axes or None})
CASES = {
    "Dense": (lambda: _model((5,), L.Dense(3)), (5,), {"kernel": (0,), "bias": None}),
    "Conv1D": (lambda: _model((6, 2), L.Conv1D(3, 3)), (6, 2), {"kernel": (0, 1), "bias": None}),
    "Conv2D": (lambda: _model((5, 5, 2), L.Conv2D(3, 3)), (5, 5, 2), {"kernel": (0, 1, 2), "bias": None}),
    "SeparableConv2D": (
        lambda: _model((5, 5, 2), L.SeparableConv2D(3, 3, depth_multiplier=2)), (5, 5, 2),
        {"depthwise_kernel": (0, 1), "pointwise_kernel": (0, 1, 2), "bias": None},
    ),
    "LSTM": (lambda: _model((4, 2), L.LSTM(3)), (4, 2),
             {"kernel": (0,), "recurrent_kernel": (0,), "bias": None}),
    "SimpleRNN": (lambda: _model((4, 2), L.SimpleRNN(3)), (4, 2),
                  {"kernel": (0,), "recurrent_kernel": (0,), "bias": None}),
    # (h, w, out, in): a filter's incoming weights span h, w and in.
    "Conv2DTranspose": (lambda: _model((4, 4, 2), L.Conv2DTranspose(3, 3)), (4, 4, 2),
                        {"kernel": (0, 1, 3), "bias": None}),
    # A name that does not say which layer it is: only the layer object tells.
    "Conv2DTranspose named 'up'": (lambda: _model((4, 4, 2), L.Conv2DTranspose(3, 3, name="up")), (4, 4, 2),
                                   {"kernel": (0, 1, 3), "bias": None}),
    # (h, w, in, multiplier): each (in, multiplier) channel sees only its h x w window.
    "DepthwiseConv2D": (lambda: _model((5, 5, 2), L.DepthwiseConv2D(3, depth_multiplier=2)), (5, 5, 2),
                        {"kernel": (0, 1), "bias": None}),
    # "abc,cde->abde": kernel (c, d, e); c is summed over; bias (d, e) has no fan-in.
    "EinsumDense": (
        lambda: _model((4, 5), L.EinsumDense("abc,cde->abde", output_shape=(4, 2, 3), bias_axes="de")),
        (4, 5), {"kernel": (0,), "bias": None},
    ),
    # q/k/v kernels (dim, heads, key_dim) contract dim; output kernel (heads, key_dim, dim)
    # contracts heads and key_dim; q/k/v biases (heads, key_dim) are biases: never centralized.
    "MultiHeadAttention": (_mha_model, (4, 6), {
        "query/kernel": (0,), "key/kernel": (0,), "value/kernel": (0,),
        "attention_output/kernel": (0, 1), "bias": None,
    }),
    # Keras' GRU bias is (2, 3 * units): input and recurrent biases, no fan-in.
    "GRU": (lambda: _model((4, 2), L.GRU(3)), (4, 2),
            {"kernel": (0,), "recurrent_kernel": (0,), "bias": None}),
    # Per-element scales of rank 2: no fan-in.
    "LayerNormalization": (lambda: _model((3, 4), L.Dense(4), L.LayerNormalization(axis=(1, 2))), (3, 4),
                           {"kernel": (0,), "bias": None, "gamma": None, "beta": None}),
    "PReLU": (lambda: _model((3, 4), L.Dense(4), L.PReLU()), (3, 4),
              {"kernel": (0,), "bias": None, "alpha": None}),
    "Embedding": (
        lambda: _model((3,), L.Embedding(7, 2), L.Flatten(), L.Dense(2), dtype="int32"), (3,),
        {"embeddings": "sparse", "kernel": (0,), "bias": None},
    ),
}


def _expected_axes(variable, rules):
    parent_and_name = "/".join(variable.path.split("/")[-2:])
    if parent_and_name in rules:
        return rules[parent_and_name]
    return rules[variable.name]


def _inputs(shape, integer):
    rng = np.random.default_rng(1)
    if integer:
        return tf.constant([[1, 4, 1], [6, 0, 4]], tf.int32)  # repeated ids: duplicate rows
    return tf.constant(rng.normal(size=(2,) + shape).astype(np.float32))


def _gradients_and_update(model, optimizer, x):
    out_shape = model(x).shape
    weights = tf.constant(np.random.default_rng(2).normal(size=out_shape).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x) * weights)
    grads = tape.gradient(loss, model.trainable_variables)
    before = [v.numpy() for v in model.trainable_variables]
    tf.function(lambda g: optimizer.apply(g, model.trainable_variables))(grads)
    deltas = [v.numpy() - b for v, b in zip(model.trainable_variables, before)]
    return grads, deltas


def _make(kind, model):
    """``kind``: the optimizer, and whether it is given the mapping or finds the layers itself."""
    mapping = None if kind.endswith("unmapped") else kgo.fan_in_axes(model)
    if kind.startswith("SGDGC"):
        return kgo.SGDGC(learning_rate=1.0, fan_in_axes=mapping)
    return kgo.with_gradient_centralization(keras.optimizers.SGD(learning_rate=1.0), fan_in_axes=mapping)


@pytest.mark.parametrize("kind", ["SGDGC", "SGDGC unmapped", "with_gradient_centralization",
                                  "with_gradient_centralization unmapped"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_update_is_minus_the_centralized_gradient(case, kind):
    factory, shape, rules = CASES[case]
    keras.utils.set_random_seed(0)
    model = factory()
    grads, deltas = _gradients_and_update(model, _make(kind, model), _inputs(shape, case == "Embedding"))
    for variable, grad, delta in zip(model.trainable_variables, grads, deltas):
        axes = _expected_axes(variable, rules)
        if axes == "sparse":
            assert isinstance(grad, tf.IndexedSlices)
            axes = None
        g = tf.convert_to_tensor(grad).numpy()
        assert np.any(g != 0), variable.path
        expected = g if axes is None else np_centralize(g, axes)
        np.testing.assert_allclose(-delta, expected, atol=2e-5, err_msg=variable.path)
        if axes is not None:
            np.testing.assert_allclose(delta.mean(axis=axes), 0.0, atol=2e-5, err_msg=variable.path)
            assert np.abs(g.mean(axis=axes)).max() > 1e-2 * np.abs(g).max(), variable.path  # GC did something


@pytest.mark.parametrize("optimizer_class", [kgo.SGDGC, kgo.AdamGC])
def test_embedding_is_not_centralized_without_mapping_even_when_l2_densifies_it(optimizer_class):
    keras.utils.set_random_seed(0)
    model = _model((3,), L.Embedding(7, 2), L.Flatten(), L.Dense(2), dtype="int32")
    table = model.trainable_variables[0]
    assert table.name == "embeddings"
    kwargs = {"centralization": "update"} if optimizer_class is kgo.AdamGC else {}
    optimizer = optimizer_class(learning_rate=1.0, weight_decay=0.5, **kwargs)
    w0 = table.numpy()
    grads, deltas = _gradients_and_update(model, optimizer, _inputs((3,), True))
    g = tf.convert_to_tensor(grads[0]).numpy() + 0.5 * w0  # L2: every row moves
    if optimizer_class is kgo.SGDGC:
        np.testing.assert_allclose(-deltas[0], g, atol=2e-5)
    else:  # Adam's first step, elementwise: lr * g / (|g| + eps / sqrt(1 - beta_2))
        np.testing.assert_allclose(-deltas[0], g / (np.abs(g) + 1e-7 / np.sqrt(1 - 0.999)), atol=2e-5)


@pytest.mark.parametrize("optimizer_class", [kgo.SGDGCC, kgo.SGDWGCC])
def test_gcc_centralizes_conv_kernels_only(optimizer_class):
    keras.utils.set_random_seed(0)
    model = _model((6, 6, 2), L.Conv2D(3, 3), L.Reshape((16, 3)), L.Conv1D(2, 3), L.Flatten(), L.Dense(2))
    optimizer = optimizer_class(learning_rate=1.0)
    grads, deltas = _gradients_and_update(model, optimizer, _inputs((6, 6, 2), False))
    for variable, grad, delta in zip(model.trainable_variables, grads, deltas):
        g = grad.numpy()
        expected = np_centralize(g, (0, 1, 2)) if len(g.shape) == 4 else g
        np.testing.assert_allclose(-delta, expected, atol=2e-5, err_msg=variable.path)
    assert len(model.trainable_variables[0].shape) == 4


def test_fan_in_axes_mapping_per_layer_type():
    inputs = keras.Input((6, 6, 4))
    x = L.Conv2DTranspose(3, 3, name="t2")(inputs)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw2")(x)
    x = L.SeparableConv2D(5, 3, name="sep2")(x)
    x = L.Conv2D(2, 3, name="c2")(x)
    x = L.Reshape((4, 2))(x)
    x = L.Conv1DTranspose(3, 2, name="t1")(x)
    x = L.DepthwiseConv1D(2, name="dw1")(x)
    x = L.SeparableConv1D(2, 2, name="sep1")(x)
    x = L.EinsumDense("abc,cd->abd", output_shape=(None, 4), bias_axes="d", name="ein")(x)
    x = L.LayerNormalization(name="ln")(x)
    model = keras.Model(inputs, x)
    ids = keras.Input((3,), dtype="int32")
    emb = keras.Model(ids, L.Embedding(5, 2, name="emb")(ids))
    mapping = {**kgo.fan_in_axes(model), **kgo.fan_in_axes(emb)}
    by_name = {"/".join(path.split("/")[-2:]): axes for path, axes in mapping.items()}
    assert by_name == {
        "t2/kernel": (0, 1, 3), "dw2/kernel": (0, 1), "sep2/depthwise_kernel": (0, 1),
        "t1/kernel": (0, 2), "dw1/kernel": (0,), "sep1/depthwise_kernel": (0,),
        "ein/kernel": (0,), "emb/embeddings": None, "ln/gamma": None, "ln/beta": None,
    }
    # Weights laid out (..., in, out) are absent from the mapping and use the
    # default; biases have no fan-in.
    resolved = {"/".join(v.path.split("/")[-2:]): fan_in.resolve_fan_in_axes(v, mapping)
                for v in model.weights}
    assert resolved["c2/kernel"] == (0, 1, 2)
    assert resolved["sep2/pointwise_kernel"] == (0, 1, 2)
    assert resolved["sep1/pointwise_kernel"] == (0, 1)
    assert all(axes is None for name, axes in resolved.items() if name.endswith("bias"))
    layer = L.Dense(3)
    layer.build((None, 4))
    assert kgo.fan_in_axes(layer) == {}


def test_mapping_survives_keras_renaming_the_outer_scope(tmp_path):
    """The same layer without its outer scope (built alone, or in a Sequential loaded from .keras,
    which drops its "sequential/" path prefix in Keras up to 3.15) keeps its mapping."""
    model = _model((4, 4, 2), L.Conv2DTranspose(3, 3, name="up"), L.Dense(2, name="head"))
    sequential = keras.Sequential([keras.Input((4, 4, 2)), L.Conv2DTranspose(3, 3, name="up")])
    alone = L.Conv2DTranspose(3, 3, name="up")
    alone.build((None, 4, 4, 2))
    path = str(tmp_path / "s.keras")
    sequential.save(path)
    loaded = keras.saving.load_model(path)
    assert alone.kernel.path == "up/kernel" and sequential.weights[0].path.endswith("/up/kernel")
    for mapping_from, variable in [(sequential, loaded.weights[0]), (loaded, sequential.weights[0]),
                                   (sequential, alone.kernel), (sequential, model.weights[0])]:
        assert fan_in.resolve_fan_in_axes(variable, kgo.fan_in_axes(mapping_from)) == (0, 1, 3)
    assert fan_in.resolve_fan_in_axes(model.weights[2], kgo.fan_in_axes(sequential)) == (0,)  # head/kernel
    ambiguous = {"a/up/kernel": (0, 1, 3), "b/up/kernel": (0, 1, 2)}
    with pytest.raises(ValueError, match="fan_in_axes"):
        fan_in.resolve_fan_in_axes(alone.kernel, ambiguous)
    agreeing = {"a/up/kernel": (0, 1, 3), "b/up/kernel": [0, 1, 3]}
    assert fan_in.resolve_fan_in_axes(alone.kernel, agreeing) == (0, 1, 3)


def test_default_fan_in_axes():
    assert fan_in.default_fan_in_axes(0) == ()
    assert fan_in.default_fan_in_axes(1) == ()
    assert fan_in.default_fan_in_axes(2) == (0,)
    assert fan_in.default_fan_in_axes(5) == (0, 1, 2, 3)


def test_fan_in_axes_bad_input():
    with pytest.raises(TypeError, match="model"):
        kgo.fan_in_axes("not a model")
    with pytest.raises(ValueError, match="built"):
        kgo.fan_in_axes(L.Dense(3))


def test_docstring_examples():
    result = doctest.testmod(fan_in, extraglobs={"tf": tf, "keras": keras})
    assert result.attempted > 0
    assert result.failed == 0
