"""GradientOpsModel on one device: telemetry, gradient ops, skipped steps, bad input, saving.

Every expectation is computed independently of the train step: gradients with
``tf.GradientTape`` on the same batches, clipping with TensorFlow's own
``tf.clip_by_*`` or NumPy, centralization and AGC in NumPy.
"""

import doctest
import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_gradops as kgo
from keras_gradops.training import gradient_ops_model

RNG = np.random.default_rng(0)
MSE = keras.losses.MeanSquaredError()


def dense_net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, activation="tanh", name="hidden"), keras.layers.Dense(3, name="out")],
        name="mlp",
    )


def conv_net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(2, name="out"),
        ],
        name="cnn",
    )


def numpy_forward(net, x):
    """``dense_net``'s forward pass in NumPy, from its weights."""
    (w1, b1), (w2, b2) = net.get_layer("hidden").get_weights(), net.get_layer("out").get_weights()
    return np.tanh(x @ w1 + b1) @ w2 + b2


def data(n, shape, out, scale=1.0):
    x = RNG.normal(size=(n, *shape)).astype("float32")
    y = (RNG.normal(size=(n, out)) * scale).astype("float32")
    return x, y


def tape_gradients(net, x, y):
    with tf.GradientTape() as tape:
        loss = MSE(y, net(x, training=True))
    return [g.numpy() for g in tape.gradient(loss, net.trainable_variables)]


def np_norm(arrays):
    return float(np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in arrays)))


def snapshot(model):
    return [v.numpy().copy() for v in model.variables + model.optimizer.variables]


# ---------------------------------------------------------------- telemetry


@pytest.mark.parametrize("jit_compile", [False, True])
def test_telemetry_is_the_epoch_mean_of_tape_norms(jit_compile):
    x, y = data(24, (4,), 3, scale=3.0)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    reference = dense_net()
    norms = [np_norm(tape_gradients(reference, bx, by)) for bx, by in batches]
    layer_norms = {
        name: [np_norm(tape_gradients(reference, bx, by)[k : k + 2]) for bx, by in batches]
        for name, k in (("hidden", 0), ("out", 2))
    }
    low, middle, _ = sorted(norms)
    threshold = (low + middle) / 2  # two of the three batches are clipped
    model = kgo.GradientOpsModel(dense_net(), global_clipnorm=threshold, layer_norms=True)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse", jit_compile=jit_compile)

    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history

    for epoch in range(2):
        np.testing.assert_allclose(history["grad_norm"][epoch], np.mean(norms), rtol=1e-5)
        np.testing.assert_allclose(history["clipped_fraction"][epoch], 2 / 3, rtol=1e-6)
        for name, values in layer_norms.items():
            np.testing.assert_allclose(history[f"grad_norm/{name}"][epoch], np.mean(values), rtol=1e-5)
    assert "skipped_steps" not in history  # only logged with skip_nonfinite
    evaluation = model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    assert set(evaluation) == {"loss"}
    loss = model.evaluate(x, y, batch_size=8, verbose=0)  # a Python float, as plain Keras returns
    assert type(loss) is float
    np.testing.assert_allclose(loss, np.mean((model.model.predict(x, verbose=0) - y) ** 2), rtol=1e-5)


# ---------------------------------------------------------------- gradient ops inside the step


def np_centralize(g, axes):
    return g - g.mean(axis=axes, keepdims=True)


def np_agc(g, w, lam, eps):
    axes = tuple(range(w.ndim - 1)) if w.ndim > 1 else tuple(range(w.ndim))
    w_norm = np.maximum(np.sqrt(np.sum(w.astype(np.float64) ** 2, axis=axes, keepdims=True)), eps)
    g_norm = np.sqrt(np.sum(g.astype(np.float64) ** 2, axis=axes, keepdims=True))
    return np.where(g_norm / w_norm > lam, g * lam * w_norm / np.maximum(g_norm, 1e-6), g)


def by_hand(option, grads, weights):
    """The gradient reaching SGD, computed with TF primitives / NumPy."""
    if option == "global_clipnorm":
        return [t.numpy() for t in tf.clip_by_global_norm([tf.constant(g) for g in grads], 0.5)[0]]
    if option == "clipnorm":
        return [tf.clip_by_norm(g, 0.3).numpy() for g in grads]
    if option == "clipvalue":
        return [np.clip(g, -0.05, 0.05) for g in grads]
    if option == "adaptive_clipping":
        return [np_agc(g, w, 0.02, 1e-3) for g, w in zip(grads, weights)]
    if option == "centralize":  # Dense and conv kernels, not biases
        return [np_centralize(g, tuple(range(g.ndim - 1))) if g.ndim > 1 else g for g in grads]
    if option == "conv_only":  # only the rank-4 conv kernel
        return [np_centralize(g, (0, 1, 2)) if g.ndim == 4 else g for g in grads]
    raise AssertionError(option)


OPTIONS = {
    "global_clipnorm": dict(global_clipnorm=0.5),
    "clipnorm": dict(clipnorm=0.3),
    "clipvalue": dict(clipvalue=0.05),
    "adaptive_clipping": dict(adaptive_clipping=0.02),
    "centralize": dict(centralize=True),
    "conv_only": dict(centralize=True, conv_only=True),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_one_step_applies_the_gradient_op_computed_by_hand(option):
    x, y = data(8, (6, 6, 2), 2, scale=5.0)
    reference = conv_net()
    weights = [w.numpy() for w in reference.trainable_variables]
    expected_grads = by_hand(option, tape_gradients(reference, x, y), weights)
    changed = [not np.allclose(e, g) for e, g in zip(expected_grads, tape_gradients(reference, x, y))]
    assert any(changed), "the op must change this gradient, or the test proves nothing"
    model = kgo.GradientOpsModel(conv_net(), **OPTIONS[option])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse", jit_compile=True)

    model.train_on_batch(x, y)

    for variable, w, g in zip(model.trainable_variables, weights, expected_grads):
        np.testing.assert_allclose(variable.numpy(), w - 0.1 * g, rtol=1e-5, atol=1e-6)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(5, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(1))
        self.out = keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(2))

    def call(self, inputs):
        return self.out(self.hidden(inputs))


def test_an_unbuilt_subclassed_model_is_built_by_the_first_step():
    x, y = data(8, (4,), 3, scale=5.0)
    reference = Subclassed()
    reference(x)
    weights = [w.numpy() for w in reference.trainable_variables]
    grads = by_hand("global_clipnorm", tape_gradients(reference, x, y), weights)
    model = kgo.GradientOpsModel(Subclassed(), global_clipnorm=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse", jit_compile=True)

    model.train_on_batch(x, y)

    for variable, w, g in zip(model.trainable_variables, weights, grads):
        np.testing.assert_allclose(variable.numpy(), w - 0.1 * g, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- non-finite steps


def test_poisoned_batch_changes_nothing_and_is_counted():
    x, y = data(16, (4,), 3)
    poisoned = x[8:].copy()
    poisoned[2, 1] = np.nan
    model = kgo.GradientOpsModel(dense_net(), global_clipnorm=1.0, centralize=True, skip_nonfinite=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", jit_compile=True)
    model.fit(x[:8], y[:8], batch_size=8, verbose=0)  # Adam slots become non-zero
    before = snapshot(model)

    history = model.fit(poisoned, y[8:], batch_size=8, verbose=0).history

    after = snapshot(model)
    assert len(before) == len(after) > len(model.variables) + 1
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)  # bit-identical, iterations included
    assert history["skipped_steps"] == [1.0]
    assert history["grad_norm"] == [0.0]  # no finite step: an empty mean

    history = model.fit(np.concatenate([poisoned, x[:8]]), y, batch_size=8, shuffle=False, verbose=0).history
    assert history["skipped_steps"] == [1.0]
    assert int(model.optimizer.iterations.numpy()) == 2
    assert all(np.isfinite(v).all() for v in snapshot(model))


def test_training_stops_after_max_consecutive_skips():
    x, y = data(40, (4,), 3)
    x[:] = np.nan
    model = kgo.GradientOpsModel(dense_net(), skip_nonfinite=True, max_consecutive_skips=3)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    steps = []
    counter = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: steps.append(batch))

    with pytest.warns(RuntimeWarning, match=r"3 consecutive steps.*max_consecutive_skips=3"):
        history = model.fit(x, y, batch_size=4, epochs=3, callbacks=[counter], verbose=0).history

    assert len(steps) == 3
    assert history["skipped_steps"] == [3.0]


def test_without_skip_nonfinite_nan_reaches_the_weights_as_in_keras():
    x, y = data(8, (4,), 3)
    x[0, 0] = np.inf
    model = kgo.GradientOpsModel(dense_net())
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.train_on_batch(x, y)
    assert not np.isfinite(model.trainable_variables[0].numpy()).all()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(global_clipnorm=1.0, clipnorm=1.0), "Only one of"),
        (dict(clipvalue=0.5, adaptive_clipping=0.01), "Only one of"),
        (dict(global_clipnorm=0.0), "global_clipnorm"),
        (dict(clipnorm=-1.0), "clipnorm"),
        (dict(adaptive_clipping=0.01, adaptive_clipping_eps=0.0), "adaptive_clipping_eps"),
        (dict(clipvalue=True), "clipvalue"),
        (dict(conv_only=True), "needs `centralize=True`"),
        (dict(centralize="yes"), "centralize"),
        (dict(skip_nonfinite=1), "skip_nonfinite"),
        (dict(max_consecutive_skips=3), "needs `skip_nonfinite=True`"),
        (dict(skip_nonfinite=True, max_consecutive_skips=0), "max_consecutive_skips"),
        (dict(layer_norms=["nope"]), "no layer 'nope'"),
        (dict(fan_in_axes={"hidden/kernel": "0"}), "fan_in_axes"),
    ],
)
def test_bad_options_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kgo.GradientOpsModel(dense_net(), **kwargs)


def test_wrapping_a_non_model_is_a_type_error():
    with pytest.raises(TypeError, match="keras.Model"):
        kgo.GradientOpsModel(keras.layers.Dense(3))
    with pytest.raises(TypeError, match="layer_norms"):
        kgo.GradientOpsModel(dense_net(), layer_norms="hidden")


def test_clipping_on_both_optimizer_and_wrapper_is_rejected():
    x, y = data(4, (4,), 3)
    model = kgo.GradientOpsModel(dense_net(), global_clipnorm=1.0)
    model.compile(optimizer=keras.optimizers.SGD(0.1, clipnorm=2.0), loss="mse")
    with pytest.raises(ValueError, match="clipnorm=2.0"):
        model.fit(x, y, verbose=0)


# ---------------------------------------------------------------- saving and export


def test_keras_file_round_trip_keeps_options_weights_and_optimizer_state(tmp_path):
    x, y = data(16, (4,), 3)
    model = kgo.GradientOpsModel(dense_net(), clipnorm=0.7, centralize=True, skip_nonfinite=True, layer_norms=["out"])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, y, batch_size=8, verbose=0)
    path = str(tmp_path / "wrapped.keras")
    model.save(path)

    loaded = keras.saving.load_model(path)  # no custom_objects

    assert type(loaded) is kgo.GradientOpsModel
    assert json.dumps(loaded.get_config(), sort_keys=True) == json.dumps(model.get_config(), sort_keys=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), numpy_forward(model.model, x), rtol=1e-5, atol=1e-6)
    for a, b in zip(snapshot(loaded), snapshot(model)):
        np.testing.assert_array_equal(a, b)
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    history = loaded.fit(x, y, batch_size=8, shuffle=False, verbose=0).history
    assert "grad_norm/out" in history and "clipped_fraction" in history
    for a, b in zip(loaded.trainable_variables, model.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def test_export_holds_only_the_inference_function(tmp_path):
    x, _ = data(5, (4,), 3)
    net = dense_net()
    model = kgo.GradientOpsModel(net, global_clipnorm=1.0, skip_nonfinite=True, max_consecutive_skips=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, x[:, :3], verbose=0)
    model.watch_gradients(["hidden"])
    model.save(str(tmp_path / "wrapped.keras"))
    exports = {"trained": model, "loaded, never called": keras.saving.load_model(str(tmp_path / "wrapped.keras"))}

    for name, wrapper in exports.items():
        path = str(tmp_path / name)
        wrapper.export(path, verbose=False)

        restored = tf.saved_model.load(path)
        assert set(restored.signatures) == {"serve", "serving_default"}, name
        assert len(restored.variables) == len(net.weights), name  # no optimizer, counter nor probe variables
        np.testing.assert_allclose(restored.serve(tf.constant(x)).numpy(), numpy_forward(net, x), rtol=1e-5, atol=1e-6)


def test_docstring_example_runs():
    result = doctest.testmod(gradient_ops_model, extraglobs={"keras": keras, "np": np})
    assert result.attempted > 0 and result.failed == 0


def test_predict_is_the_wrapped_models():
    x, _ = data(6, (4,), 3)
    net = dense_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = kgo.GradientOpsModel(net)
    np.testing.assert_allclose(model.predict(x, verbose=0), numpy_forward(net, x), rtol=1e-5, atol=1e-6)


def test_recompiling_after_freezing_a_layer_rebuilds_the_chain_for_the_new_variables():
    x, y = data(8, (4,), 3)
    net = dense_net()
    model = kgo.GradientOpsModel(net, centralize=True, layer_norms=["out"])
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    model.fit(x, y, verbose=0)
    net.get_layer("hidden").trainable = False
    frozen = [w.copy() for w in net.get_layer("hidden").get_weights()]
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    before = net.get_layer("out").get_weights()[0].copy()
    gradients = tape_gradients(net, x, y)  # the output layer's kernel and bias: the trained weights
    gradient = gradients[0]
    history = model.fit(x, y, batch_size=8, verbose=0).history
    assert history["grad_norm/out"][0] == pytest.approx(np_norm(gradients), rel=1e-5)
    for a, b in zip(frozen, net.get_layer("hidden").get_weights()):
        np.testing.assert_array_equal(a, b)
    expected = before - (gradient - gradient.mean(axis=0, keepdims=True))
    np.testing.assert_allclose(net.get_layer("out").get_weights()[0], expected, rtol=1e-5, atol=1e-6)
