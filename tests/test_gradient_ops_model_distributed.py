"""GradientOpsModel under MirroredStrategy (2 logical CPUs) and under mixed_float16.

Both are compared with the float32 single-device run on the same global
batches: the aggregated gradient, not each replica's, is clipped, measured
and checked for NaN; loss scaling is undone before the gradient ops.
XLA cannot compile a step spanning two devices (a TensorFlow limitation,
plain Keras models included), so the distributed runs use jit_compile=False.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_gradops as kgo
from keras_gradops import reductions

RNG = np.random.default_rng(1)


def dense_net():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, activation="tanh", name="hidden"), keras.layers.Dense(3, name="out")]
    )


def data(n):
    return RNG.normal(size=(n, 4)).astype("float32"), (RNG.normal(size=(n, 3)) * 4).astype("float32")


def snapshot(model):
    return [v.numpy().copy() for v in model.variables + model.optimizer.variables]


def wrapped(net, weights, optimizer, **options):
    net.set_weights(weights)
    model = kgo.GradientOpsModel(net, **options)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    return model


OPTIONS = dict(global_clipnorm=0.3, centralize=True, skip_nonfinite=True, layer_norms=True)


def test_mirrored_matches_single_device_on_the_same_global_batch(two_replica_strategy):
    x, y = data(32)
    weights = dense_net().get_weights()
    single = wrapped(dense_net(), weights, keras.optimizers.SGD(0.1, momentum=0.9), **OPTIONS)
    with two_replica_strategy.scope():
        mirrored = wrapped(dense_net(), weights, keras.optimizers.SGD(0.1, momentum=0.9), **OPTIONS)

    expected = single.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    history = mirrored.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history

    assert expected["clipped_fraction"] == [1.0, 1.0]
    for name in ("loss", "grad_norm", "clipped_fraction", "grad_norm/hidden", "grad_norm/out", "skipped_steps"):
        np.testing.assert_allclose(history[name], expected[name], rtol=1e-5, err_msg=name)
    for a, b in zip(mirrored.trainable_variables, single.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    for a, b in zip(mirrored.optimizer.variables, single.optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_keras_own_global_clipnorm_differs_on_these_batches(two_replica_strategy):
    """The data above is sensitive: Keras clips each replica's gradient before the all-reduce."""
    x, y = data(32)
    weights = dense_net().get_weights()

    def keras_run():
        net = dense_net()
        net.set_weights(weights)
        net.compile(optimizer=keras.optimizers.SGD(0.1, global_clipnorm=0.3), loss="mse", jit_compile=False)
        net.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        return net.get_weights()

    single = keras_run()
    with two_replica_strategy.scope():
        mirrored = keras_run()
    assert max(np.max(np.abs(a - b)) for a, b in zip(single, mirrored)) > 1e-3


def test_nan_on_the_second_replica_only_skips_the_step_everywhere(two_replica_strategy):
    x, y = data(16)
    poisoned = x[8:].copy()
    poisoned[6, 2] = np.nan  # row 6 of a global batch of 8 goes to replica 1
    per_replica = two_replica_strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(poisoned).batch(8)
    )
    first, second = two_replica_strategy.experimental_local_results(next(iter(per_replica)))
    assert np.isfinite(first.numpy()).all() and not np.isfinite(second.numpy()).all()
    with two_replica_strategy.scope():
        model = wrapped(dense_net(), dense_net().get_weights(), keras.optimizers.Adam(1e-2), skip_nonfinite=True)
    model.fit(x[:8], y[:8], batch_size=8, verbose=0)
    before = snapshot(model)

    history = model.fit(poisoned, y[8:], batch_size=8, shuffle=False, verbose=0).history

    for b, a in zip(before, snapshot(model)):
        np.testing.assert_array_equal(a, b)
    assert history["skipped_steps"] == [1.0]  # counted once, not once per replica


# ---------------------------------------------------------------- mixed precision


def test_mixed_precision_updates_match_float32(mixed_float16):
    x, y = data(24)
    y /= 4  # keeps the scaled float16 backward pass below 65504
    keras.mixed_precision.set_global_policy("float32")
    reference_net = dense_net()
    weights = reference_net.get_weights()
    keras.mixed_precision.set_global_policy("mixed_float16")
    # The threshold is far above the true norms (no clipping) but far below the scaled ones.
    options = dict(global_clipnorm=100.0, centralize=True)
    reference = kgo.GradientOpsModel(reference_net, dtype="float32", **options)
    reference.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=True)
    model = wrapped(dense_net(), weights, keras.optimizers.SGD(0.1), **options)
    model.jit_compile = True
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)

    expected = reference.fit(x, y, batch_size=8, shuffle=False, verbose=0).history
    history = model.fit(x, y, batch_size=8, shuffle=False, verbose=0).history

    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**15  # scaled, never overflowed
    assert expected["clipped_fraction"] == history["clipped_fraction"] == [0.0]
    np.testing.assert_allclose(history["grad_norm"], expected["grad_norm"], rtol=1e-2)
    for variable, w, v32 in zip(model.trainable_variables, weights, reference.trainable_variables):
        update, update32 = variable.numpy() - w, v32.numpy() - w
        assert np.linalg.norm(update - update32) <= 1e-2 * np.linalg.norm(update32)


def test_mixed_precision_overflow_skips_and_halves_the_loss_scale(mixed_float16):
    x, y = data(8)
    x[0, 0] = 1e5  # float16 overflows to inf in the forward pass
    model = wrapped(dense_net(), dense_net().get_weights(), keras.optimizers.SGD(0.1), skip_nonfinite=True)
    model.jit_compile = True
    model.build((None, 4))
    model.optimizer.build(model.trainable_variables)
    before = [v.numpy().copy() for v in model.trainable_variables]

    history = model.fit(x, y, batch_size=8, verbose=0).history

    assert history["skipped_steps"] == [1.0]
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**14
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(v.numpy(), b)


# ---------------------------------------------------------------- one all-reduce per step


def _reductions(strategy, model):
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="mse", jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    model.make_train_function()  # the wrapper installs its chain on the optimizer's all-reduce here
    spec = (tf.TensorSpec((None, 4), tf.float32), tf.TensorSpec((None, 3), tf.float32))
    return reductions.train_step_reductions(model, spec)


def test_one_all_reduce_of_the_gradient_per_step_as_plain_keras(two_replica_strategy):
    with two_replica_strategy.scope():
        keras_step = _reductions(two_replica_strategy, dense_net())
        wrapper_step = _reductions(two_replica_strategy, kgo.GradientOpsModel(dense_net(), **OPTIONS))
    gradient_bytes = sum(int(np.prod(v.shape)) * 4 for v in dense_net().trainable_variables)
    assert keras_step["values"] == 4 and sum(keras_step["bytes"]) == gradient_bytes
    # skip_nonfinite adds one float32: the replicas agree whether to skip before the all-reduce.
    assert wrapper_step["values"] == keras_step["values"] + 1
    assert wrapper_step["bytes"] == keras_step["bytes"] + [4]


def test_jit_compile_with_replicas_on_cpu_is_refused_with_the_reason(two_replica_strategy):
    x, y = data(8)
    with two_replica_strategy.scope():
        model = wrapped(dense_net(), dense_net().get_weights(), keras.optimizers.SGD(0.1))
    model.jit_compile = True
    with pytest.raises(ValueError, match="jit_compile=False.*|Collectives are not yet implemented"):
        model.fit(x, y, batch_size=8, verbose=0)
