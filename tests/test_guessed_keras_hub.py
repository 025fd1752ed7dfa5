"""Guessed gradients on keras_hub backbones (random weights, nothing downloaded) under a task head:
ViT with LoRA and with prompt tokens, BERT and GPT-2 with their dictionary inputs.

keras_hub comes with the `examples` extra (it needs Keras >= 3.15 and tensorflow-text), so these tests
are marked `examples_extra`; the module imports it only inside its fixtures.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_gradops as kgo
from keras_gradops import GuessedGradientModel
from test_guessed_graphs import double_tape_jvp

pytestmark = pytest.mark.examples_extra
MSE = keras.losses.MeanSquaredError()
PER_EXAMPLE = keras.losses.MeanSquaredError(reduction=None)


@pytest.fixture(scope="module")
def keras_hub():
    import keras_hub

    return keras_hub


def tiny_vit(keras_hub):
    return keras_hub.models.ViTBackbone(image_shape=(16, 16, 3), patch_size=8, num_layers=2, num_heads=2,
                                        hidden_dim=16, mlp_dim=32)


def vit_lora(keras_hub):
    """A ViT backbone with LoRA (rank 2) on its attention's query and value, under a Dense head."""
    keras.utils.set_random_seed(0)
    backbone = tiny_vit(keras_hub)
    images = keras.Input((16, 16, 3))
    net = keras.Model(images, keras.layers.Dense(3, name="head")(backbone(images)[:, 0]))
    backbone.enable_lora(2)
    rng = np.random.default_rng(1)
    for v in backbone.trainable_variables:  # LoRA's B starts at zero: give A a gradient too
        if "lora_kernel_b" in v.path:
            v.assign(rng.normal(size=v.shape) * 0.3)
    return net, rng.normal(size=(4, 16, 16, 3)).astype("float32")


def vit_prompts(keras_hub):
    """A frozen ViT with 3 prompt tokens after its class token (VPT-shallow) and a Dense head."""
    keras.utils.set_random_seed(0)
    backbone = tiny_vit(keras_hub)
    backbone.trainable = False
    images = keras.Input((16, 16, 3))
    tokens = backbone.get_layer("vit_patching_and_embedding")(images)
    tokens = kgo.layers.PromptTokens(3, index=1, name="prompts")(tokens)
    features = backbone.get_layer("vit_encoder")(tokens)
    net = keras.Model(images, keras.layers.Dense(3, name="head")(features[:, 0]))
    return net, np.random.default_rng(1).normal(size=(4, 16, 16, 3)).astype("float32")


def bert(keras_hub):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=30, num_layers=2, num_heads=2, hidden_dim=16,
                                             intermediate_dim=32, max_sequence_length=8, dropout=0.0)
    inputs = {name: keras.Input((6,), dtype="int32", name=name)
              for name in ("token_ids", "segment_ids", "padding_mask")}
    net = keras.Model(inputs, keras.layers.Dense(3, name="head")(backbone(inputs)["pooled_output"]))
    rng = np.random.default_rng(1)
    mask = np.ones((4, 6), "int32")
    mask[:, 4:] = 0
    return net, {"token_ids": rng.integers(0, 30, (4, 6)).astype("int32"),
                 "segment_ids": np.zeros((4, 6), "int32"), "padding_mask": mask}


def bert_lora(keras_hub):
    """``bert`` with LoRA (rank 2) on its attention's query and value, the rest frozen."""
    net, x = bert(keras_hub)
    backbone = next(layer for layer in net.layers if isinstance(layer, keras_hub.models.BertBackbone))
    backbone.enable_lora(2)
    rng = np.random.default_rng(3)
    for v in backbone.trainable_variables:
        if "lora_kernel_b" in v.path:
            v.assign(rng.normal(size=v.shape) * 0.3)
    return net, x


def gpt2(keras_hub):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=30, num_layers=2, num_heads=2, hidden_dim=16,
                                             intermediate_dim=32, max_sequence_length=8, dropout=0.0)
    inputs = {name: keras.Input((6,), dtype="int32", name=name) for name in ("token_ids", "padding_mask")}
    net = keras.Model(inputs, keras.layers.Dense(3, name="head")(backbone(inputs)[:, -1]))
    rng = np.random.default_rng(1)
    return net, {"token_ids": rng.integers(0, 30, (4, 6)).astype("int32"), "padding_mask": np.ones((4, 6), "int32")}


@pytest.mark.parametrize("build", [vit_lora, bert, gpt2])
def test_directional_descent_per_example_derivatives_are_the_tapes(keras_hub, build):
    """Each example's directional derivative, weighted by its sample weight, equals the double-tape JVP's."""
    net, x = build(keras_hub)
    y = np.random.default_rng(2).normal(size=(4, 3)).astype("float32")
    weights = np.array([0.5, 2.0, 0.0, 1.5], "float32")
    model = GuessedGradientModel(net, method="directional_descent", noise="normal")
    model.compile(optimizer="sgd", loss=MSE)
    grads, draws = model.guess_gradients(x, y, sample_weight=weights, seed=5, return_draws=True)
    variables = net.trainable_variables
    tangents = [draws[0][v.path] for v in variables]
    derivatives = double_tape_jvp(lambda: PER_EXAMPLE(y, net(x, training=True)), variables, tangents).numpy()
    derivative = np.sum(weights * derivatives) / len(weights)
    assert abs(derivative) > 1e-3
    for got, v in zip(grads, tangents):
        np.testing.assert_allclose(got.numpy(), derivative * v.numpy(), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("build", [bert_lora])
def test_spsa_fit_moves_only_the_trainable_weights_by_the_central_difference(keras_hub, build):
    """One SGD step under Keras' default jit_compile: ``theta' - theta = -lr (grad L . z) z`` (z = +-1),
    frozen weights (the base kernels, the frozen backbone) bit-for-bit unchanged. (A small ``eps``: a random
    transformer's loss is curved enough that MeZO's 1e-3 is 14% off the derivative here, 1e-4 0.2%.)"""
    net, x = build(keras_hub)
    y = np.random.default_rng(2).normal(size=(4, 3)).astype("float32")
    variables = net.trainable_variables
    before = [v.numpy() for v in variables]
    frozen = [v.numpy().copy() for v in net.non_trainable_variables]
    with tf.GradientTape() as tape:
        loss = MSE(y, net(x, training=False))
    true = [g.numpy() for g in tape.gradient(loss, variables)]
    model = GuessedGradientModel(net, method="spsa", seed=3, perturbation_scale=1e-4)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=MSE)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    change = [v.numpy() - b for v, b in zip(variables, before)]
    z = [np.sign(c) for c in change]
    projected = sum(np.sum(g * d) for g, d in zip(true, z))
    assert abs(projected) > 1e-3
    for c, d in zip(change, z):
        np.testing.assert_allclose(c, -projected * d, rtol=2e-2, atol=1e-6)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(frozen, net.non_trainable_variables))


@pytest.mark.parametrize("build", [vit_lora])
def test_activation_perturbation_step_under_xla_is_the_eager_guess(keras_hub, build):
    """Guesses at the backbone's own linear layers (LoRA's query and value, reached inside keras_hub's blocks):
    one SGD(1) step under XLA, with the second pass rebuilding every guess, moves the weights by the guess made
    eagerly from the same seed, and leaves the frozen weights bit-for-bit unchanged."""
    net, x = build(keras_hub)
    y = np.random.default_rng(2).normal(size=(4, 3)).astype("float32")
    eager = GuessedGradientModel(net, method="activation_perturbation", seed=4)
    eager.compile(optimizer="sgd", loss=MSE)
    plan = eager.guess_plan()
    assert any(rule.startswith("activation_perturbation at the pre-activation of 'query'") for rule in plan.values())
    expected = eager.guess_gradients(x, y)
    before = [v.numpy() for v in net.trainable_variables]
    frozen = [v.numpy().copy() for v in net.non_trainable_variables]
    model = GuessedGradientModel(net, method="activation_perturbation", seed=4)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=MSE, jit_compile=True)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    for old, v, g in zip(before, net.trainable_variables, expected):
        np.testing.assert_allclose(old - v.numpy(), g.numpy(), rtol=1e-3, atol=1e-6)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(frozen, net.non_trainable_variables))


def test_forward_mode_through_an_op_xla_cannot_differentiate_says_what_to_do(keras_hub):
    """Full fine-tuning of BERT under XLA: Keras' ops.slice in keras_hub's PositionEmbedding compiles to an XLA op
    without a derivative rule, so no forward-mode tangent crosses it; the error says so and what to do."""
    net, x = bert(keras_hub)
    model = GuessedGradientModel(net, method="directional_descent", seed=0)
    model.compile(optimizer="sgd", loss=MSE, jit_compile=True)
    with pytest.raises(ValueError, match="cannot carry a forward-mode tangent.*XlaDynamicUpdateSlice.*spsa"):
        model.fit(x, np.zeros((4, 3), "float32"), batch_size=4, verbose=0)
