"""The guessed gradients against independent computations.

- the definitions of every method, rebuilt in NumPy from the same random
  draws on a hand-checkable MLP (per-layer gradients by NumPy backprop),
  and activation_mixing's matrix at a batch it draws in several row blocks;
- unbiasedness of directional descent and activation perturbation: the mean
  of many guesses is the tf.GradientTape gradient within 5 standard errors
  estimated from the samples (and weight_transpose, biased, fails that test);
- the "backprop" oracle equals tf.GradientTape on the wrapped model;
- recompute=True and XLA give the same guesses;
- the paper's ordering of cosine similarities at init on a 3x128 MLP;
- weight_transpose, one_layer_downstream (transposed convolutions,
  Flatten/Reshape between sites) and activation_mixing on Conv2D sites,
  rebuilt in NumPy with the convolution written as a matrix and its filter
  gradient as loops;
- a Dense layer's weight update on [batch, time, features] inputs, summed
  over every leading axis, against NumPy's einsum (eager and XLA).
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

from keras_gradops import GuessedGradientModel
from keras_gradops.training.guessed import guesses, noise
from keras_gradops.training.guessed.kernel_gradient import kernel_gradient, transposed_layout_pays
from keras_gradops.training.guessed.methods import get as get_method
from keras_gradops.training.guessed.stack import LayerStack
from test_guessed_memory import compiled_program

MSE = keras.losses.MeanSquaredError()
SPARSE_CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def hand_mlp(l2=0.0):
    keras.utils.set_random_seed(1)
    regularizer = keras.regularizers.L2(l2) if l2 else None
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(4, activation="relu", name="h1", kernel_regularizer=regularizer),
        keras.layers.Dense(3, activation="relu", name="h2"),
        keras.layers.Dense(2, name="out"),
    ])


def wrapped(net, method, loss=MSE, **kwargs):
    model = GuessedGradientModel(net, method=method, **kwargs)
    model.compile(optimizer="sgd", loss=loss)
    return model


def tape_gradient(net, x, y, loss=MSE, sample_weight=None):
    with tf.GradientTape() as tape:
        value = loss(y, net(x, training=True), sample_weight=sample_weight)
        value += sum(net.losses)
    return [g.numpy() for g in tape.gradient(value, net.trainable_variables)]


def numpy_forward_backward(net, x, y):
    """Per-layer inputs, pre-activations and dL/ds for the MSE loss, by hand in float64."""
    weights = [w.numpy().astype(np.float64) for w in net.trainable_variables]
    (w1, b1, w2, b2, w3, b3) = weights
    x = x.astype(np.float64)
    s1 = x @ w1 + b1
    a1 = np.maximum(s1, 0)
    s2 = a1 @ w2 + b2
    a2 = np.maximum(s2, 0)
    s3 = a2 @ w3 + b3
    batch, outputs = s3.shape
    g3 = 2 * (s3 - y) / (batch * outputs)
    g2 = (g3 @ w3.T) * (s2 > 0)
    g1 = (g2 @ w2.T) * (s1 > 0)
    return dict(w=(w1, w2, w3), x=(x, a1, a2), s=(s1, s2, s3), g=(g1, g2, g3))


def update_from_guesses(fb, guesses):
    """x_l^T (d * y_l) and sum_b d_b y_l with d_b = sum_l <dL/ds_l, y_l>_b."""
    d = sum(np.sum(g * y, axis=1) for g, y in zip(fb["g"], guesses))
    out = []
    for x_in, y in zip(fb["x"], guesses):
        out += [x_in.T @ (d[:, None] * y), np.sum(d[:, None] * y, axis=0)]
    return out


def expected_guesses(method, fb, draw):
    relu_mask = [(s > 0).astype(np.float64) for s in fb["s"]]
    w1, w2, w3 = fb["w"]
    if method == "activation_perturbation":
        return [draw["h1"], draw["h2"], draw["out"]]
    if method == "weight_transpose":
        return [(draw["h1"] @ w2.T) * relu_mask[0], (draw["h2"] @ w3.T) * relu_mask[1], draw["out"]]
    if method == "one_layer_downstream":
        # eps at the next layer's output, pulled back through its ReLU (none for "out"), W and this ReLU.
        return [((draw["h1"] * relu_mask[1]) @ w2.T) * relu_mask[0],
                (draw["h2"] @ w3.T) * relu_mask[1], draw["out"]]
    if method == "activation_mixing":
        outputs = [np.maximum(fb["s"][0], 0), np.maximum(fb["s"][1], 0), fb["s"][2]]
        return [(draw[name] @ a) * (mask if name != "out" else 1.0)
                for name, a, mask in zip(("h1", "h2", "out"), outputs, relu_mask)]
    raise AssertionError(method)


def batch():
    rng = np.random.default_rng(0)
    return rng.normal(size=(6, 5)).astype("float32"), rng.normal(size=(6, 2)).astype("float32")


@pytest.mark.parametrize("noise", ["normal", "rademacher"])
@pytest.mark.parametrize("method", ["activation_perturbation", "weight_transpose",
                                    "one_layer_downstream", "activation_mixing"])
def test_activation_space_guess_matches_its_definition(method, noise):
    net = hand_mlp()
    x, y = batch()
    model = wrapped(net, method, num_guesses=2, noise=noise)
    grads, draws = model.guess_gradients(x, y, seed=3, return_draws=True)
    if noise == "rademacher":  # +-1 (the mixing matrix: +-1/sqrt(B))
        scale = 1 / np.sqrt(len(x)) if method == "activation_mixing" else 1.0
        signs = np.concatenate([v.numpy().ravel() for d in draws for v in d.values()])
        np.testing.assert_allclose(np.unique(signs), [-scale, scale], rtol=1e-6)
    fb = numpy_forward_backward(net, x, y)
    per_guess = [update_from_guesses(fb, expected_guesses(method, fb, {k: v.numpy() for k, v in d.items()}))
                 for d in draws]
    assert len(draws) == 2
    for got, first, second in zip(grads, *per_guess):
        np.testing.assert_allclose(got.numpy(), (first + second) / 2, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["activation_perturbation", "weight_transpose",
                                    "one_layer_downstream", "activation_mixing"])
def test_default_guess_matches_its_definition(method):
    """GuessedGradientModel(net, method=...) alone: +-1 draws, the update rebuilt in a second pass."""
    net = hand_mlp()
    x, y = batch()
    grads, draws = wrapped(net, method).guess_gradients(x, y, seed=6, return_draws=True)
    scale = 1 / np.sqrt(len(x)) if method == "activation_mixing" else 1.0
    signs = np.concatenate([v.numpy().ravel() for v in draws[0].values()])
    np.testing.assert_allclose(np.unique(signs), [-scale, scale], rtol=1e-6)
    fb = numpy_forward_backward(net, x, y)
    expected = update_from_guesses(fb, expected_guesses(method, fb, {k: v.numpy() for k, v in draws[0].items()}))
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_mixing_matrix_drawn_in_row_blocks_matches_its_definition(jit_compile):
    """At batch 1000, M (1000 x 1000) is drawn and applied 263 rows at a time, the last block part-used."""
    net = hand_mlp()
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(1000, 5)).astype("float32"), rng.normal(size=(1000, 2)).astype("float32")
    model = wrapped(net, "activation_mixing")
    grads, draws = tf.function(lambda: model.guess_gradients(x, y, seed=[4, 1], return_draws=True),
                               jit_compile=jit_compile)()
    mixing = {name: m.numpy() for name, m in draws[0].items()}
    for m in mixing.values():
        assert m.shape == (1000, 1000)
        np.testing.assert_allclose(np.unique(m), [-1 / np.sqrt(1000), 1 / np.sqrt(1000)], rtol=1e-6)
        # Each block has its own signs: a repeated block would agree with the first everywhere.
        assert 0.45 < np.mean(m[:263] == m[263:526]) < 0.55
        assert 0.45 < np.mean(m[:211] == m[789:]) < 0.55  # the last block: 211 rows
    fb = numpy_forward_backward(net, x, y)
    expected = update_from_guesses(fb, expected_guesses("activation_mixing", fb, mixing))
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("noise", ["normal", "rademacher"])
def test_weight_transpose_noise_drawn_in_row_blocks_matches_its_definition(noise, monkeypatch):
    """Without XLA, eps W^T is drawn a block of rows at a time: with blocks of 1000 entries, h1's
    eps (1100 x 3, x_next 1100 x 4) comes in 250-row blocks, the fifth part-used."""
    monkeypatch.setattr(guesses, "_TRANSPOSE_BLOCK_ELEMENTS", 1000)
    net = hand_mlp()
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(1100, 5)).astype("float32"), rng.normal(size=(1100, 2)).astype("float32")
    grads, draws = wrapped(net, "weight_transpose", noise=noise).guess_gradients(x, y, seed=[2, 9],
                                                                                return_draws=True)
    eps = {name: value.numpy() for name, value in draws[0].items()}
    assert eps["h1"].shape == (1100, 3)
    if noise == "rademacher":
        np.testing.assert_array_equal(np.unique(eps["h1"]), [-1.0, 1.0])
    # Each block has its own draws: a repeated block would agree in sign with the first everywhere.
    assert 0.4 < np.mean(np.sign(eps["h1"][:250]) == np.sign(eps["h1"][250:500])) < 0.6
    assert 0.35 < np.mean(np.sign(eps["h1"][:100]) == np.sign(eps["h1"][1000:])) < 0.65  # the last: 100 rows
    fb = numpy_forward_backward(net, x, y)
    expected = update_from_guesses(fb, expected_guesses("weight_transpose", fb, eps))
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("noise", ["normal", "rademacher"])
def test_directional_descent_is_directional_derivative_times_tangent(noise):
    net = hand_mlp()
    x, y = batch()
    model = wrapped(net, "directional_descent", noise=noise)
    grads, draws = model.guess_gradients(x, y, seed=5, return_draws=True)
    true = tape_gradient(net, x, y)
    tangents = [draws[0][v.path].numpy() for v in net.trainable_variables]
    derivative = sum(np.sum(g * v) for g, v in zip(true, tangents))
    for got, v in zip(grads, tangents):
        np.testing.assert_allclose(got.numpy(), derivative * v, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("activation", ["tanh", "log_softmax"])
def test_directional_derivative_through_other_activations(activation):
    """The tangent crosses a layer's own activation by its Jacobian, symmetric or not (log_softmax's is not)."""
    keras.utils.set_random_seed(7)
    net = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation=activation),
                            keras.layers.Dense(2)])
    x, y = batch()
    grads, draws = wrapped(net, "directional_descent").guess_gradients(x, y, seed=2, return_draws=True)
    tangents = [draws[0][v.path].numpy() for v in net.trainable_variables]
    derivative = sum(np.sum(g * v) for g, v in zip(tape_gradient(net, x, y), tangents))
    for got, v in zip(grads, tangents):
        np.testing.assert_allclose(got.numpy(), derivative * v, rtol=2e-4, atol=1e-6)


def test_weight_regularizer_gradient_is_added_exactly():
    net = hand_mlp(l2=0.1)
    x, y = batch()
    grads, draws = wrapped(net, "weight_transpose").guess_gradients(x, y, seed=4, return_draws=True)
    fb = numpy_forward_backward(net, x, y)
    expected = update_from_guesses(fb, expected_guesses("weight_transpose", fb,
                                                        {k: v.numpy() for k, v in draws[0].items()}))
    expected[0] = expected[0] + 2 * 0.1 * fb["w"][0]
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-6)


def test_backprop_method_is_the_tape_gradient():
    net = hand_mlp(l2=0.01)
    x, y = batch()
    sample_weight = np.linspace(0.5, 2.0, 6).astype("float32")
    model = wrapped(net, "backprop")
    got = model.guess_gradients(x, y, sample_weight=sample_weight)
    for a, b in zip(got, tape_gradient(net, x, y, sample_weight=sample_weight)):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-6, atol=1e-8)


def conv_net():
    keras.utils.set_random_seed(2)
    return keras.Sequential([
        keras.Input((5, 5, 2)),
        keras.layers.Conv2D(3, 3, activation="relu", padding="same", strides=2, name="conv"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, name="out"),
    ])


def normalised_net():
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(4, name="h1"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Activation("tanh"),
        keras.layers.LayerNormalization(name="ln"),
        keras.layers.Dense(3, name="out"),
    ])


def z_scores(samples, true):
    """(mean - true) / (sample std / sqrt(n)) per coordinate; 0 where every sample equals the truth."""
    n = samples.shape[0]
    error = samples.mean(axis=0) - true
    standard_error = samples.std(axis=0, ddof=1) / np.sqrt(n)
    exact = (standard_error == 0) & (np.abs(error) < 1e-7)
    return np.where(exact, 0.0, error / np.maximum(standard_error, 1e-30))


def sampled_guesses(net, method, x, y, loss, count, noise="normal"):
    model = wrapped(net, method, loss=loss, noise=noise)
    guess = tf.function(lambda seed: tf.concat([tf.reshape(g, [-1]) for g in model.guess_gradients(x, y, seed=seed)], 0))
    return np.stack([guess(tf.constant([i, 17])).numpy() for i in range(count)])


UNBIASED_CASES = [
    ("directional_descent", hand_mlp, (6, 5), MSE, "normal"),
    ("activation_perturbation", hand_mlp, (6, 5), MSE, "normal"),
    ("directional_descent", conv_net, (4, 5, 5, 2), SPARSE_CE, "normal"),
    ("activation_perturbation", conv_net, (4, 5, 5, 2), SPARSE_CE, "normal"),
    ("activation_perturbation", normalised_net, (6, 5), SPARSE_CE, "normal"),
    ("directional_descent", hand_mlp, (6, 5), MSE, "rademacher"),
    ("activation_perturbation", conv_net, (4, 5, 5, 2), SPARSE_CE, "rademacher"),
    ("activation_perturbation", hand_mlp, (6, 5), MSE, None),  # the defaults
]


@pytest.mark.parametrize("method,make_net,x_shape,loss,noise", UNBIASED_CASES)
def test_mean_of_guesses_is_the_true_gradient(method, make_net, x_shape, loss, noise):
    net = make_net()
    rng = np.random.default_rng(1)
    x = rng.normal(size=x_shape).astype("float32")
    y = rng.normal(size=(x_shape[0], 2)).astype("float32") if loss is MSE else rng.integers(0, 3, x_shape[0])
    samples = sampled_guesses(net, method, x, y, loss, count=1500, noise=noise)
    true = np.concatenate([g.ravel() for g in tape_gradient(net, x, y, loss)])
    z = z_scores(samples, true)
    assert np.max(np.abs(z)) < 5.0, np.round(z, 1)
    # Not a vacuous bound: the error shrinks well below the gradient itself.
    assert np.linalg.norm(samples.mean(axis=0) - true) < 0.5 * np.linalg.norm(true)


def test_the_unbiasedness_check_detects_weight_transpose_bias():
    net = hand_mlp()
    x, y = batch()
    samples = sampled_guesses(net, "weight_transpose", x, y, MSE, count=1500)
    true = np.concatenate([g.ravel() for g in tape_gradient(net, x, y)])
    assert np.max(np.abs(z_scores(samples, true))) > 5.0


@pytest.mark.parametrize("method", ["activation_perturbation", "weight_transpose",
                                    "one_layer_downstream", "activation_mixing"])
def test_recompute_gives_the_same_guess(method):
    net = hand_mlp()
    x, y = batch()
    stored = wrapped(net, method, num_guesses=2, recompute=False)
    recomputed = wrapped(net, method, num_guesses=2, recompute=True)
    seed = tf.constant([9, 9])
    a = tf.function(lambda: stored.guess_gradients(x, y, seed=seed))()
    b = tf.function(lambda: recomputed.guess_gradients(x, y, seed=seed))()
    for u, v in zip(a, b):
        np.testing.assert_allclose(u.numpy(), v.numpy(), rtol=1e-5, atol=1e-7)


def test_under_xla_guesses_match_their_definition():
    net = hand_mlp()
    x, y = batch()
    fb = numpy_forward_backward(net, x, y)
    for method in ("weight_transpose", "one_layer_downstream"):
        model = wrapped(net, method)
        grads, draws = tf.function(lambda: model.guess_gradients(x, y, seed=[2, 8], return_draws=True),
                                   jit_compile=True)()
        expected = update_from_guesses(fb, expected_guesses(method, fb, {k: v.numpy() for k, v in draws[0].items()}))
        for got, want in zip(grads, expected):
            np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-6)
    backprop = wrapped(net, "backprop")
    exact = tf.function(lambda: backprop.guess_gradients(x, y), jit_compile=True)()
    for got, want in zip(exact, tape_gradient(net, x, y)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)


def test_cosine_similarity_at_init_orders_as_the_paper():
    """W^T and 1-layer downstream > activation perturbation > directional descent (3x128 MLP, CIFAR-sized)."""
    keras.utils.set_random_seed(4)
    net = keras.Sequential([keras.Input((3072,)), keras.layers.Dense(128, activation="relu"),
                            keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)])
    x = tf.random.normal((128, 3072))
    y = tf.random.uniform((128,), 0, 10, tf.int32)
    true = np.concatenate([g.ravel() for g in tape_gradient(net, x, y, SPARSE_CE)])
    mean_cosine = {}
    for method in ("directional_descent", "activation_perturbation", "weight_transpose", "one_layer_downstream"):
        guesses = sampled_guesses(net, method, x, y, SPARSE_CE, count=20)
        cosines = guesses @ true / (np.linalg.norm(guesses, axis=1) * np.linalg.norm(true))
        mean_cosine[method] = cosines.mean()
    assert mean_cosine["weight_transpose"] > mean_cosine["activation_perturbation"]
    assert mean_cosine["one_layer_downstream"] > mean_cosine["activation_perturbation"]
    assert mean_cosine["activation_perturbation"] > 5 * mean_cosine["directional_descent"] > 0



@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("shape", [(4000, 6), (3, 37)])
def test_rademacher_draws_are_independent_fair_signs(jit_compile, shape):
    """+-1 only, mean 0 and covariance I within 5 standard errors (1/sqrt(n) for each entry)."""
    draw = tf.function(lambda seed: noise.draw("rademacher", seed, shape, tf.float32), jit_compile=jit_compile)
    first, second = draw(tf.constant([5, 6], tf.int64)).numpy(), draw(tf.constant([5, 7], tf.int64)).numpy()
    assert first.shape == shape and set(np.unique(first)) == {-1.0, 1.0}
    assert np.mean(first != second) > 0.4  # another seed, other signs
    samples = np.concatenate([first, second]).reshape(-1, 6 if shape[1] == 6 else 1)
    n = samples.shape[0]
    assert np.max(np.abs(samples.mean(axis=0))) < 5 / np.sqrt(n)
    covariance = samples.T @ samples / n
    assert np.max(np.abs(covariance - np.eye(samples.shape[1]))) < 5 / np.sqrt(n)


def numpy_splitmix64(z):
    z = z.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_rademacher_signs_are_the_bits_of_splitmix64_words(jit_compile):
    """Sign 64 i + k is bit k of splitmix64(key + (i + 1) * WEYL), key from the seed: rebuilt in NumPy."""
    seed = np.array([-3, 2 ** 40 + 7], np.int64)
    got = tf.function(lambda s: noise.draw("rademacher", s, [5, 30], tf.float32), jit_compile=jit_compile)(
        tf.constant(seed)).numpy()
    weyl = np.uint64(0x9E3779B97F4A7C15)
    first, second = seed.view(np.uint64)
    with np.errstate(over="ignore"):
        key = numpy_splitmix64(np.array([first + numpy_splitmix64(np.array([second + weyl]))[0]]))[0]
        words = numpy_splitmix64(key + np.arange(1, 4, dtype=np.uint64) * weyl)
    bits = (words[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    np.testing.assert_array_equal(got.ravel(), (2.0 * bits.ravel()[:150] - 1).astype(np.float32))


def test_nested_blocks_are_guessed_layer_by_layer():
    """A Sequential block inside a functional model: the same W^T guess as the flat MLP's, by NumPy."""
    keras.utils.set_random_seed(5)
    block = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="relu", name="h1"),
                              keras.layers.Dense(3, activation="relu", name="h2")], name="block")
    inputs = keras.Input((5,))
    net = keras.Model(inputs, keras.layers.Dense(2, name="out")(block(inputs)))
    x, y = batch()
    grads, draws = wrapped(net, "weight_transpose").guess_gradients(x, y, seed=3, return_draws=True)
    assert sorted(draws[0]) == ["h1", "h2", "out"]
    fb = numpy_forward_backward(net, x, y)
    expected = update_from_guesses(fb, expected_guesses("weight_transpose", fb,
                                                        {k: v.numpy() for k, v in draws[0].items()}))
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-6)


# -- Conv2D sites in weight_transpose, one_layer_downstream and activation_mixing -----------------


def two_conv_net(padding, known_size=True):
    """5x5x2 images; with ``known_size=False`` the spatial size is known only at run time."""
    keras.utils.set_random_seed(6)
    flat = 2 * 2 * 2 if padding == "valid" else 3 * 3 * 2
    return keras.Sequential([
        keras.Input((5, 5, 2) if known_size else (None, None, 2)),
        keras.layers.Conv2D(3, 3, activation="relu", padding="same", name="c1"),
        keras.layers.Conv2D(2, 3, strides=2, activation="relu", padding=padding, name="c2"),
        keras.layers.Flatten() if known_size else keras.layers.Reshape((flat,)),
        keras.layers.Dense(3, name="out"),
    ])


def conv_taps(k, size, out, stride, padding):
    """(o, p, di, dj, i, j): output (o, p) reads input (i, j) through kernel tap (di, dj) (TF's padding rule)."""
    pad = 0 if padding == "valid" else max((out - 1) * stride + k - size, 0) // 2
    for o in range(out):
        for p in range(out):
            for di in range(k):
                for dj in range(k):
                    i, j = o * stride + di - pad, p * stride + dj - pad
                    if 0 <= i < size and 0 <= j < size:
                        yield o, p, di, dj, i, j


def conv_matrix(kernel, size, stride, padding):
    """The convolution of a (size, size, C) input as a (size*size*C, out*out*F) matrix."""
    k, _, channels, filters = kernel.shape
    out = (size - k) // stride + 1 if padding == "valid" else -(-size // stride)
    matrix = np.zeros((size, size, channels, out, out, filters))
    for o, p, di, dj, i, j in conv_taps(k, size, out, stride, padding):
        matrix[i, j, :, o, p, :] = kernel[di, dj]
    return matrix.reshape(size * size * channels, out * out * filters), (out, out, filters)


def conv_kernel_gradient(kernel_shape, stride, padding, x, g):
    """dL/dK of conv(x, K) for dL/ds = g, by explicit loops."""
    grad = np.zeros(kernel_shape)
    for o, p, di, dj, i, j in conv_taps(kernel_shape[0], x.shape[1], g.shape[1], stride, padding):
        grad[di, dj] += x[:, i, j, :].T @ g[:, o, p, :]
    return grad


@pytest.mark.parametrize("method", ["weight_transpose", "one_layer_downstream", "activation_mixing"])
@pytest.mark.parametrize("padding,mode", [("valid", "eager"), ("same", "xla"), ("same", "recompute"),
                                          ("valid", "unknown_size")])
def test_conv_sites_guess_by_their_definition(method, padding, mode):
    """y_l = J_act^T (eps K^T), K^T the transposed convolution (or J_act^T (M act(s_l)) over each example's
    whole feature map), and the filter updates, rebuilt in NumPy.

    Eager with every layer's guess kept (recompute=False), under tf.function, XLA and recompute=True too
    ("auto" recomputes here: the first layer's guesses outsize the input); "unknown_size":
    Input((None, None, 2)) and a Reshape instead of Flatten.
    """
    net = two_conv_net(padding, known_size=mode != "unknown_size")
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(4, 5, 5, 2)).astype("float32"), rng.normal(size=(4, 3)).astype("float32")
    model = wrapped(net, method, recompute=True if mode == "recompute" else False if mode == "eager" else "auto")
    step = lambda: model.guess_gradients(x, y, seed=[4, 1], return_draws=True)  # noqa: E731
    grads, draws = step() if mode == "eager" else tf.function(step, jit_compile=mode == "xla")()
    draw = {k: v.numpy().astype(np.float64) for k, v in draws[0].items()}
    k1, b1, k2, b2, w3, b3 = [w.numpy().astype(np.float64) for w in net.trainable_variables]
    m1, shape1 = conv_matrix(k1, 5, 1, "same")
    m2, shape2 = conv_matrix(k2, 5, 2, padding)
    # Forward and backprop of the MSE loss in float64.
    batch = len(x)
    x0 = x.astype(np.float64)
    s1 = (x0.reshape(batch, -1) @ m1).reshape(batch, *shape1) + b1
    a1 = np.maximum(s1, 0)
    s2 = (a1.reshape(batch, -1) @ m2).reshape(batch, *shape2) + b2
    a2 = np.maximum(s2, 0)
    s3 = a2.reshape(batch, -1) @ w3 + b3
    g3 = 2 * (s3 - y) / s3.size
    g2 = (g3 @ w3.T).reshape(s2.shape) * (s2 > 0)
    g1 = (g2.reshape(batch, -1) @ m2.T).reshape(s1.shape) * (s1 > 0)
    if method == "activation_mixing":  # B x B mixing of the examples' outputs
        y1, y2, y3 = ((draw[name] @ a.reshape(batch, -1)).reshape(s.shape) * mask
                      for name, a, s, mask in (("c1", a1, s1, s1 > 0), ("c2", a2, s2, s2 > 0), ("out", s3, s3, 1.0)))
    else:  # eps at c2's pre-activation (c1) and at out's (c2), pulled back through K^T
        eps1 = draw["c1"] * (s2 > 0) if method == "one_layer_downstream" else draw["c1"]
        assert draw["c1"].shape == s2.shape and draw["c2"].shape == s3.shape
        y1 = (eps1.reshape(batch, -1) @ m2.T).reshape(s1.shape) * (s1 > 0)
        y2 = (draw["c2"] @ w3.T).reshape(s2.shape) * (s2 > 0)
        y3 = draw["out"]
    d = sum(np.sum((g * guess).reshape(batch, -1), axis=1) for g, guess in zip((g1, g2, g3), (y1, y2, y3)))
    dy1, dy2, dy3 = (d.reshape(-1, *[1] * (guess.ndim - 1)) * guess for guess in (y1, y2, y3))
    expected = [
        conv_kernel_gradient(k1.shape, 1, "same", x0, dy1), dy1.sum(axis=(0, 1, 2)),
        conv_kernel_gradient(k2.shape, 2, padding, a1, dy2), dy2.sum(axis=(0, 1, 2)),
        a2.reshape(batch, -1).T @ dy3, dy3.sum(axis=0),
    ]
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("units", [4, 130])  # under XLA, 4 outputs take the transposed product, 130 the matmul
@pytest.mark.parametrize("jit_compile", [False, True])
def test_dense_weight_update_sums_over_every_leading_axis(jit_compile, units):
    """A Dense layer on [batch, time, features]: x^T cotangent summed over batch and time, as NumPy's einsum."""
    assert transposed_layout_pays(4) and not transposed_layout_pays(130)
    keras.utils.set_random_seed(5)
    net = keras.Sequential([keras.Input((3, 5)), keras.layers.Dense(units, activation="relu"), keras.layers.Dense(2)])
    site = LayerStack(net, get_method("activation_perturbation")).sites[0]
    rng = np.random.default_rng(6)
    x, cotangent = rng.normal(size=(7, 3, 5)).astype("float32"), rng.normal(size=(7, 3, units)).astype("float32")
    kernel_grad, bias_grad = tf.function(site.weight_update, jit_compile=jit_compile)(x, cotangent)
    np.testing.assert_allclose(kernel_grad.numpy(), np.einsum("btd,btu->du", x, cotangent), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bias_grad.numpy(), cotangent.sum(axis=(0, 1)), rtol=1e-5, atol=1e-6)


def test_narrow_kernel_gradient_compiles_to_a_row_major_product_under_xla():
    """``x^T c`` for a 48 -> 8 kernel: XLA's dot is ``c^T x`` (contracting the operands' rows), not ``x``'s major axis.

    TensorFlow's ``matmul(x, c, transpose_a=True)`` compiles to a dot
    contracting ``x``'s major axis (checked here too), which XLA on CPU runs
    at half the rate for narrow outputs (``benchmarks/kernel_gradient_layouts.py``).
    """
    x, c = tf.random.normal([64, 48]), tf.random.normal([64, 8])

    def dots(f):
        program = compiled_program(tf.function(f, jit_compile=True), x, c, "optimized_hlo")
        return [line for line in program.splitlines() if " dot(" in line]

    (plain,) = dots(lambda x, c: tf.matmul(x, c, transpose_a=True))
    assert "f32[48,8]" in plain and "lhs_contracting_dims={0}" in plain
    (transposed,) = dots(kernel_gradient)
    assert "f32[8,48]" in transposed and "lhs_contracting_dims={1}, rhs_contracting_dims={0}" in transposed
    got = tf.function(kernel_gradient, jit_compile=True)(x, c)
    np.testing.assert_allclose(got.numpy(), x.numpy().T @ c.numpy(), rtol=1e-5, atol=1e-5)
