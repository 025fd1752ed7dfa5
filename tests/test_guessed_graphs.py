"""Guessed gradients on any Keras graph: directional descent, spsa and backprop on residual, attention,
embedding, convolutional, nested, multi-input, subclassed and LoRA models; prompt tokens; the guess plan.

Every expectation is computed without forward mode: directional derivatives by the double-tape trick
(the reverse of a reverse-mode product), losses at moved weights by assigning them and running the model.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_gradops as kgo
from keras_gradops import GuessedGradientModel

MSE = keras.losses.MeanSquaredError()


def double_tape_jvp(values_fn, variables, tangents):
    """``J V`` of ``values_fn()`` (a tensor) in ``variables`` along ``tangents``, by two reverse passes.

    ``g(u) = J^T u`` is linear in ``u``, so its gradient in ``u`` along ``V`` is ``J V``.
    """
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            values = values_fn()
        u = tf.zeros_like(values)
        outer.watch(u)
        pulled = [tf.convert_to_tensor(p) for p in inner.gradient(values, variables, output_gradients=u)]
    return outer.gradient(pulled, u, output_gradients=tangents)


# -- graphs, one or two layer types each, built with every weight non-zero --------------------------


def _residual_mlp():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="gelu")(inputs)
    hidden = keras.layers.Dense(6)(hidden)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Add()([inputs, hidden])))


def _transformer_block(length=5):
    tokens = keras.Input((length, 8))
    h = keras.layers.LayerNormalization()(tokens)
    h = tokens + keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(h, h)
    m = keras.layers.Dense(16, activation="gelu")(keras.layers.LayerNormalization()(h))
    h = keras.layers.Add()([h, keras.layers.Dense(8)(m)])
    return keras.Model(tokens, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h)))


def _embedding():
    ids = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(20, 6)(ids)
    return keras.Model(ids, keras.layers.Dense(3)(keras.layers.Flatten()(h)))


def _convolutions_concatenated():
    images = keras.Input((6, 6, 2))
    a = keras.layers.Conv2D(3, 3, activation="relu")(images)
    b = keras.layers.Conv2D(2, 3, padding="valid")(images)
    h = keras.layers.Concatenate()([a, b])
    return keras.Model(images, keras.layers.Dense(3)(keras.layers.Flatten()(h)))


def _einsum_softmax():
    tokens = keras.Input((5, 8))
    scores = keras.layers.EinsumDense("btd,de->bte", output_shape=(5, 4), bias_axes="e")(tokens)
    h = keras.layers.Softmax(axis=-1)(scores)
    return keras.Model(tokens, keras.layers.Dense(3)(keras.layers.Flatten()(h)))


def _nested_two_inputs():
    block_in = keras.Input((4,))
    block = keras.Model(block_in, keras.layers.Dense(4, activation="tanh")(block_in), name="block")
    a, b = keras.Input((4,)), keras.Input((4,))
    h = keras.layers.Concatenate()([block(a), block(b), a * b])
    return keras.Model([a, b], keras.layers.Dense(3)(h))


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.first = keras.layers.Dense(5, activation="relu")
        self.second = keras.layers.Dense(3)

    def call(self, x):
        return self.second(self.first(x) + x[:, :5])


def _subclassed():
    net = _Subclassed()
    net(np.zeros((1, 6), "float32"))
    return net


def _lora():
    """LoRA on a Dense and an EinsumDense layer; ``lora_kernel_b`` made non-zero so every factor has a gradient."""
    tokens = keras.Input((5, 8))
    dense = keras.layers.Dense(8, name="dense")
    einsum = keras.layers.EinsumDense("btd,de->bte", output_shape=(5, 6), bias_axes="e", name="einsum")
    net = keras.Model(tokens, keras.layers.Dense(3, name="head")(keras.layers.Flatten()(einsum(dense(tokens)))))
    for layer in (dense, einsum):
        layer.enable_lora(2)
        layer.lora_kernel_b.assign(np.random.default_rng(1).normal(size=layer.lora_kernel_b.shape) * 0.3)
    return net


GRAPHS = {
    "residual_mlp": (_residual_mlp, (6,)),
    "transformer_block": (_transformer_block, (5, 8)),
    "embedding": (_embedding, "ids"),
    "convolutions_concatenated": (_convolutions_concatenated, (6, 6, 2)),
    "einsum_softmax": (_einsum_softmax, (5, 8)),
    "nested_two_inputs": (_nested_two_inputs, "pair"),
    "subclassed": (_subclassed, (6,)),
    "lora": (_lora, (5, 8)),
}


def _graph(name, batch=4):
    keras.utils.set_random_seed(3)
    build, shape = GRAPHS[name]
    net = build()
    rng = np.random.default_rng(0)
    if shape == "ids":
        x = rng.integers(0, 20, size=(batch, 5)).astype("int32")
    elif shape == "pair":
        x = [rng.normal(size=(batch, 4)).astype("float32") for _ in range(2)]
    else:
        x = rng.normal(size=(batch, *shape)).astype("float32")
    y = rng.normal(size=(batch, 3)).astype("float32")
    return net, x, y


def _wrapped(net, method, **kwargs):
    model = GuessedGradientModel(net, method=method, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=MSE)
    return model


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_directional_descent_on_a_graph_weighs_each_example_by_its_directional_derivative(name):
    """``g_hat = (sum_b w_b <grad l_b, V> / B) V`` with each ``<grad l_b, V>`` from the double-tape JVP."""
    net, x, y = _graph(name)
    weights = np.array([0.5, 2.0, 0.0, 1.5], "float32")
    model = _wrapped(net, "directional_descent", noise="normal")
    grads, draws = model.guess_gradients(x, y, sample_weight=weights, seed=5, return_draws=True)
    variables = net.trainable_variables
    tangents = [draws[0][v.path] for v in variables]
    per_example = keras.losses.MeanSquaredError(reduction=None)
    derivatives = double_tape_jvp(lambda: per_example(y, net(x)), variables, tangents).numpy()
    derivative = np.sum(weights * derivatives) / len(weights)
    assert abs(derivative) > 1e-3
    for got, v in zip(grads, tangents):
        np.testing.assert_allclose(got.numpy(), derivative * v.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["transformer_block", "nested_two_inputs", "lora"])
def test_backprop_on_a_graph_is_the_tape_gradient(name):
    net, x, y = _graph(name)
    grads = _wrapped(net, "backprop").guess_gradients(x, y)
    with tf.GradientTape() as tape:
        loss = MSE(y, net(x))
    for got, want in zip(grads, tape.gradient(loss, net.trainable_variables)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-7)


def _loss_at(net, x, y, variables, shift):
    """The loss with every variable moved by ``shift`` (then put back), in inference mode."""
    saved = [v.numpy() for v in variables]
    for v, s in zip(variables, shift):
        v.assign(v.numpy() + s)
    loss = float(MSE(y, net(x, training=False)))
    for v, value in zip(variables, saved):
        v.assign(value)
    return loss


def _spsa_net():
    """A residual graph with Dropout and BatchNormalization, which spsa runs in inference mode."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu")(inputs)
    h = keras.layers.Dropout(0.5)(keras.layers.BatchNormalization()(h))
    h = keras.layers.Add()([keras.layers.Dense(6)(h), inputs])
    return keras.Model(inputs, keras.layers.Dense(3)(h))


@pytest.mark.parametrize("noise", ["normal", "rademacher"])
def test_spsa_is_the_central_difference_along_its_draw_and_restores_the_weights(noise):
    net = _spsa_net()
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(8, 6)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
    variables = net.trainable_variables
    before = [v.numpy() for v in net.variables]
    eps = 1e-3
    grads, draws = _wrapped(net, "spsa", noise=noise, perturbation_scale=eps).guess_gradients(
        x, y, seed=7, return_draws=True)
    z = [draws[0][v.path].numpy() for v in variables]
    for old, v in zip(before, net.variables):  # moved and put back, to rounding; moving statistics untouched
        np.testing.assert_allclose(v.numpy(), old, rtol=0, atol=1e-6)
    plus = _loss_at(net, x, y, variables, [eps * d for d in z])
    minus = _loss_at(net, x, y, variables, [-eps * d for d in z])
    projected = (plus - minus) / (2 * eps)
    assert abs(projected) > 1e-2
    for got, d in zip(grads, z):
        np.testing.assert_allclose(got.numpy(), projected * d, rtol=2e-3, atol=1e-5)
    # ... which is directional descent's (grad L . z) z to O(eps^2):
    with tf.GradientTape() as tape:
        loss = MSE(y, net(x, training=False))
    exact = sum(np.sum(g.numpy() * d) for g, d in zip(tape.gradient(loss, variables), z))
    np.testing.assert_allclose(projected, exact, rtol=5e-2)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_spsa_step_moves_the_weights_along_one_direction_by_the_directional_derivative(jit_compile):
    """One SGD step: ``theta' - theta = -lr (grad L . z) z`` with ``z`` the step's (+-1) draw, read back from the
    change itself; if the in-place moves and the forward passes were reordered (XLA), ``L+ = L-`` and nothing moves."""
    net, x, y = _graph("transformer_block", batch=8)
    variables = net.trainable_variables
    before = [v.numpy() for v in variables]
    with tf.GradientTape() as tape:
        loss = MSE(y, net(x, training=False))
    true = [g.numpy() for g in tape.gradient(loss, variables)]
    model = GuessedGradientModel(net, method="spsa", seed=3)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=MSE, jit_compile=jit_compile)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    change = [v.numpy() - b for v, b in zip(variables, before)]
    z = [np.sign(c) for c in change]
    assert all(np.all(d != 0) for d in z)
    projected = sum(np.sum(g * d) for g, d in zip(true, z))
    for c, d in zip(change, z):
        np.testing.assert_allclose(c, -projected * d, rtol=2e-2, atol=1e-6)


@pytest.mark.parametrize("method", ["directional_descent", "spsa", "backprop"])
def test_fit_leaves_frozen_weights_bit_for_bit_unchanged(method):
    """LoRA freezes the base kernels, and a frozen layer takes part in the forward pass only."""
    net, x, y = _graph("lora", batch=8)
    net.layers[1].trainable = False  # the Dense under LoRA, its factors too
    frozen = [v.numpy().copy() for v in net.non_trainable_variables]
    trainable = [v.numpy().copy() for v in net.trainable_variables]
    assert len(frozen) == 5 and len(trainable) == 5
    model = GuessedGradientModel(net, method=method, seed=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=MSE)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    for old, v in zip(frozen, net.non_trainable_variables):
        assert np.array_equal(old, v.numpy()), v.path
    assert all(not np.allclose(old, v.numpy()) for old, v in zip(trainable, net.trainable_variables))


def test_guess_plan_lists_every_trainable_variable_and_its_rule():
    keras.utils.set_random_seed(0)
    chain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu", name="a"),
                              keras.layers.LayerNormalization(name="norm"), keras.layers.Dense(3, name="b")],
                             name="chain")
    chain.get_layer("norm").trainable = False
    plan = GuessedGradientModel(chain, method="one_layer_downstream").guess_plan()
    assert plan == {
        "chain/a/kernel": "one_layer_downstream at the pre-activation of 'a'",
        "chain/a/bias": "one_layer_downstream at the pre-activation of 'a'",
        "chain/b/kernel": "activation_perturbation at the pre-activation of 'b' (the last Dense/Conv2D layer)",
        "chain/b/bias": "activation_perturbation at the pre-activation of 'b' (the last Dense/Conv2D layer)",
    }
    chain.get_layer("norm").trainable = True
    plan = GuessedGradientModel(chain, method="activation_perturbation").guess_plan()
    assert plan["chain/norm/gamma"].startswith("weight perturbation")
    net, _, _ = _graph("lora")
    for method, rule in (("directional_descent", "weight perturbation"), ("spsa", "spsa"), ("backprop", "exact")):
        plan = GuessedGradientModel(net, method=method).guess_plan()
        assert list(plan) == [v.path for v in net.trainable_variables]
        assert all(r.startswith(rule) for r in plan.values())


def test_next_layer_methods_refuse_a_graph_and_name_the_methods_that_train_it():
    whole = "methods that train this model: directional_descent, activation_perturbation, activation_mixing, spsa, backprop."
    net, _, _ = _graph("transformer_block")
    with pytest.raises(ValueError, match="takes 2 inputs.*weight_transpose") as error:
        GuessedGradientModel(net, method="weight_transpose")
    assert str(error.value).endswith(whole)
    with pytest.raises(ValueError, match="subclassed model.*one_layer_downstream") as error:
        GuessedGradientModel(_subclassed(), method="one_layer_downstream")
    assert str(error.value).endswith(whole)
    inputs = keras.Input((4, 3))
    sliced = keras.Model(inputs, keras.layers.Dense(2)(inputs[:, 0]))
    with pytest.raises(ValueError, match="'get_item.*not a layer"):
        GuessedGradientModel(sliced, method="weight_transpose")
    net, _, _ = _graph("lora")  # a chain, but LoRA layers are no chain sites
    with pytest.raises(ValueError, match="Layer 'dense'.*must be Dense, Conv2D or a normalisation layer") as error:
        GuessedGradientModel(net, method="weight_transpose")
    assert str(error.value).endswith(
        "Methods that support it: directional_descent, activation_perturbation, activation_mixing, spsa, backprop.")


def test_directional_descent_refuses_a_recurrent_layer_inside_a_graph():
    inputs = keras.Input((5, 3))
    h = keras.layers.LSTM(4, name="lstm")(inputs)
    net = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Concatenate()([h, inputs[:, 0]])))
    with pytest.raises(ValueError, match="recurrent layer's loop \\('lstm' inside it\\).*spsa, backprop"):
        GuessedGradientModel(net, method="directional_descent")
    GuessedGradientModel(net, method="spsa")  # no derivative: any layer


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="spsa", perturbation_scale=0.0), "`perturbation_scale` must be a finite number > 0"),
    (dict(method="spsa", perturbation_scale="1e-3"), "`perturbation_scale` must be a finite number > 0"),
    (dict(method="spsa", perturbation_scale=float("inf")), "`perturbation_scale` must be a finite number > 0"),
    (dict(method="directional_descent", perturbation_scale=1e-3), "does not use it"),
    (dict(method="spsa", recompute=True), "`recompute=True`"),
])
def test_bad_spsa_arguments_raise(kwargs, message):
    net, _, _ = _graph("residual_mlp")
    with pytest.raises(ValueError, match=message):
        GuessedGradientModel(net, **kwargs)


def test_spsa_under_a_strategy_with_two_replicas_raises(two_replica_strategy):
    with two_replica_strategy.scope():
        net, x, y = _graph("residual_mlp", batch=8)
        model = _wrapped(net, "spsa")
    with pytest.raises(ValueError, match="method='spsa' moves the weights in place"):
        model.fit(x, y, batch_size=8, verbose=0)


def test_config_round_trip_keeps_the_perturbation_scale():
    net, _, _ = _graph("residual_mlp")
    model = GuessedGradientModel(net, method="spsa", perturbation_scale=0.01, seed=2)
    config = model.get_config()
    assert config["perturbation_scale"] == 0.01 and config["method"] == "spsa"


# -- prompt tokens ---------------------------------------------------------------------------------


def test_prompt_tokens_insert_the_same_trained_tokens_into_every_sequence():
    layer = kgo.layers.PromptTokens(2, index=1)
    x = np.arange(2 * 3 * 4, dtype="float32").reshape(2, 3, 4)
    out = layer(x).numpy()
    prompts = layer.prompts.numpy()
    expected = np.concatenate([x[:, :1], np.broadcast_to(prompts, (2, 2, 4)), x[:, 1:]], axis=1)
    np.testing.assert_array_equal(out, expected)
    assert layer.compute_output_shape((None, 3, 4)) == (None, 5, 4)
    clone = kgo.layers.PromptTokens.from_config(layer.get_config())
    assert (clone.num_tokens, clone.index) == (2, 1)


@pytest.mark.parametrize("kwargs,shape,message", [
    (dict(num_tokens=0), (2, 3, 4), "`num_tokens` must be an int >= 1"),
    (dict(num_tokens=2.0), (2, 3, 4), "`num_tokens` must be an int >= 1"),
    (dict(num_tokens=2, index=-1), (2, 3, 4), "`index` must be an int >= 0"),
    (dict(num_tokens=2, index=4), (2, 3, 4), "past the sequence's length 3"),
    (dict(num_tokens=2), (2, 4), r"\(batch, length, dim\)"),
])
def test_prompt_tokens_bad_input_raises(kwargs, shape, message):
    with pytest.raises(ValueError, match=message):
        kgo.layers.PromptTokens(**kwargs)(np.zeros(shape, "float32"))


@pytest.mark.parametrize("method", ["directional_descent", "spsa"])
def test_prompt_tuning_trains_only_the_prompts_and_the_head(method):
    """Prompt tuning of a frozen transformer block: its directional derivative is the tape's, nothing else moves."""
    keras.utils.set_random_seed(5)
    block = _transformer_block(length=None)
    tokens = keras.Input((5, 8))
    h = kgo.layers.PromptTokens(3, name="prompts")(tokens)
    body = keras.Model(block.inputs, block.layers[-2].output)  # up to the pooling
    body.trainable = False
    net = keras.Model(tokens, keras.layers.Dense(3, name="head")(body(h)))
    assert [v.path for v in net.trainable_variables] == ["prompts/prompts", "head/kernel", "head/bias"]
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 5, 8)).astype("float32"), rng.normal(size=(4, 3)).astype("float32")
    model = _wrapped(net, method, seed=0)
    grads, draws = model.guess_gradients(x, y, seed=4, return_draws=True)
    tangents = [draws[0][v.path] for v in net.trainable_variables]
    derivative = float(tf.reduce_sum(double_tape_jvp(lambda: MSE(y, net(x, training=False)),
                                                     net.trainable_variables, tangents)))
    for got, v in zip(grads, tangents):
        np.testing.assert_allclose(got.numpy(), derivative * v.numpy(), rtol=2e-2, atol=1e-5)
    frozen = [v.numpy().copy() for v in net.non_trainable_variables]
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(frozen, net.non_trainable_variables))


# -- activation-space guesses on a graph -----------------------------------------------------------


def _residual_with_norm():
    """x -> d1 (gelu) -> LayerNormalization -> d2, added to x -> d3: three linear sites and a normalisation
    layer, whose scale and offset are guessed by weight perturbation."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(6, name="d2")(keras.layers.LayerNormalization(name="norm")(
        keras.layers.Dense(8, activation="gelu", name="d1")(inputs)))
    return keras.Model(inputs, keras.layers.Dense(3, name="d3")(keras.layers.Add()([inputs, h])))


def _rebuilt_activation_perturbation(net, x, y, draws):
    """The guess of ``_residual_with_norm`` rebuilt by hand: ``g_l = dL/ds_l`` from a tape on a hand-written
    forward pass, the norm's per-example gradient from its Jacobian, ``d_b = sum_l <g_l, y_l>_b + <J_b, V>``,
    site updates ``x_l^T (d * y_l)`` and ``sum_b d_b y_l``, the norm's ``(sum_b d_b) V``."""
    w1, b1, gamma, beta, w2, b2, w3, b3 = [v.value for v in net.trainable_variables]
    norm = net.get_layer("norm")
    x = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        s1 = tf.matmul(x, w1) + b1
        tape.watch(s1)
        a1 = tf.nn.gelu(s1, approximate=False)
        n = norm(a1)
        s2 = tf.matmul(n, w2) + b2
        tape.watch(s2)
        h = x + s2
        s3 = tf.matmul(h, w3) + b3
        tape.watch(s3)
        per_example = tf.reduce_mean(tf.square(s3 - y), axis=1) / len(y)
        loss = tf.reduce_sum(per_example)
    g1, g2, g3 = [g.numpy() for g in tape.gradient(loss, [s1, s2, s3])]
    jacobians = [j.numpy() for j in tape.jacobian(per_example, [gamma, beta])]
    v_gamma, v_beta = draws[norm.gamma.path], draws[norm.beta.path]
    y1, y2, y3 = draws["d1"], draws["d2"], draws["d3"]
    d = (np.sum(g1 * y1, 1) + np.sum(g2 * y2, 1) + np.sum(g3 * y3, 1)
         + jacobians[0] @ v_gamma + jacobians[1] @ v_beta)
    inputs = [x.numpy(), n.numpy(), h.numpy()]
    site = [(inputs[i].T @ (d[:, None] * guess), np.sum(d[:, None] * guess, 0)) for i, guess in enumerate((y1, y2, y3))]
    return [*site[0], d.sum() * v_gamma, d.sum() * v_beta, *site[1], *site[2]]


@pytest.mark.parametrize("recompute", [False, True])
def test_activation_perturbation_on_a_graph_matches_its_definition(recompute):
    net = _residual_with_norm()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 6)).astype("float32"), rng.normal(size=(4, 3)).astype("float32")
    model = _wrapped(net, "activation_perturbation", noise="normal", recompute=recompute)
    grads, draws = model.guess_gradients(x, y, seed=3, return_draws=True)
    expected = _rebuilt_activation_perturbation(net, x, y, {k: v.numpy() for k, v in draws[0].items()})
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["activation_perturbation", "activation_mixing"])
def test_graph_step_under_xla_is_the_eager_guess(method):
    """One SGD(1) step of ``fit`` under XLA (the second pass rebuilding every guess) moves the weights by the guess
    ``guess_gradients`` makes eagerly from the same seed (signs: the same draws under XLA)."""
    net = _residual_with_norm()
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 6)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
    expected = _wrapped(net, method, seed=11).guess_gradients(x, y)
    before = [v.numpy() for v in net.trainable_variables]
    model = GuessedGradientModel(net, method=method, seed=11)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=MSE, jit_compile=True)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for old, v, g in zip(before, net.trainable_variables, expected):
        np.testing.assert_allclose(old - v.numpy(), g.numpy(), rtol=1e-4, atol=1e-6)


def _rebuilt_lora_guess(net, x, y, draws):
    """Activation perturbation on ``_lora()`` rebuilt by hand: ``g_l = dL/ds_l`` from a tape on a hand-written
    forward pass, ``d_b = sum_l <g_l, y_l>_b``, ``c_l = d * y_l``; a LoRA layer ``s = x (K_0 + A B) + b``
    (``lora_alpha = rank``) gets ``g(b) = sum c``, ``g(A) = x^T (c B^T)``, ``g(B) = (x A)^T c``."""
    dense, einsum, head = (layer for layer in net.layers if layer.trainable_weights)
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        s1 = tf.matmul(x, dense.kernel) + dense.bias
        tape.watch(s1)
        s2 = tf.einsum("btd,de->bte", s1, einsum.kernel) + einsum.bias
        tape.watch(s2)
        flat = tf.reshape(s2, [len(y), -1])
        s3 = tf.matmul(flat, head.kernel) + head.bias
        tape.watch(s3)
        loss = MSE(y, s3)
    gs = [g.numpy() for g in tape.gradient(loss, [s1, s2, s3])]
    ys = [draws[layer.name] for layer in (dense, einsum, head)]
    d = sum(np.sum(g * guess, axis=tuple(range(1, g.ndim))) for g, guess in zip(gs, ys))
    c1, c2, c3 = [np.reshape(d, (-1,) + (1,) * (guess.ndim - 1)) * guess for guess in ys]

    def lora(layer, inputs, c):
        a, b = layer.lora_kernel_a.numpy(), layer.lora_kernel_b.numpy()
        return [c.sum(axis=(0, 1)), np.einsum("btd,btr->dr", inputs, c @ b.T), np.einsum("btr,bto->ro", inputs @ a, c)]

    return [*lora(dense, x.numpy(), c1), *lora(einsum, s1.numpy(), c2), flat.numpy().T @ c3, c3.sum(axis=0)]


def test_activation_perturbation_on_lora_layers_guesses_both_factors():
    net, x, y = _graph("lora")
    model = _wrapped(net, "activation_perturbation", noise="normal")
    assert model.guess_plan()["dense/lora_kernel_a"] == "activation_perturbation at the pre-activation of 'dense'"
    grads, draws = model.guess_gradients(x, y, seed=6, return_draws=True)
    expected = _rebuilt_lora_guess(net, x, y, {k: v.numpy() for k, v in draws[0].items()})
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-6)


def test_cosine_diagnostics_of_prompt_tuning_under_xla_are_the_eager_guess_against_the_tape():
    """Under XLA a tape around the tangent pass would differentiate the forward accumulators' own gradient ops
    (a slice's XlaDynamicUpdateSlice has none): the true gradient comes from a backward pass of its own."""
    keras.utils.set_random_seed(5)
    tokens = keras.Input((5, 8))
    body = _transformer_block(length=None)
    body.trainable = False
    net = keras.Model(tokens, body(kgo.layers.PromptTokens(3, index=1)(tokens)))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 5, 8)).astype("float32"), rng.normal(size=(4, 3)).astype("float32")
    guess = np.concatenate([g.numpy().ravel() for g in
                            _wrapped(net, "activation_perturbation", seed=9).guess_gradients(x, y)])
    with tf.GradientTape() as tape:
        loss = MSE(y, net(x))
    true = np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, net.trainable_variables)])
    model = GuessedGradientModel(net, method="activation_perturbation", seed=9, cosine_diagnostics=True)
    model.compile(optimizer="sgd", loss=MSE, jit_compile=True)
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    expected = guess @ true / np.linalg.norm(guess) / np.linalg.norm(true)
    assert history.history["cosine_similarity"][0] == pytest.approx(expected, rel=1e-4)
