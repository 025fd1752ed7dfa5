"""The GC optimizers inside Keras' machinery: tf.distribute, mixed precision,
gradient accumulation, EMA, and .keras save / load / resume.

Expected values come from closed forms or NumPy (clip, then centralize), never
from the optimizers under test.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_gradops as kgo


def np_gc(x):
    if x.ndim <= 1:
        return x
    return x - x.mean(axis=tuple(range(x.ndim - 1)), keepdims=True)


def np_global_clip(grads, c):
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))
    return [g * c / max(norm, c) for g in grads], norm


# ---------------------------------------------------------------- MirroredStrategy


def _replica_gradients(per_replica):
    """Inside strategy.run: the gradient list of the current replica."""
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    return [tf.where(tf.equal(replica, 0), tf.constant(a), tf.constant(b)) for a, b in per_replica]


def _run_on_two_replicas(strategy, make_optimizer, initial, per_replica, steps=1):
    with strategy.scope():
        variables = [keras.Variable(w) for w in initial]
        optimizer = make_optimizer()
        optimizer.build(variables)

    @tf.function
    def step():
        strategy.run(lambda: optimizer.apply(_replica_gradients(per_replica), variables))

    for _ in range(steps):
        step()
    return optimizer, variables


GLOBAL_CLIP_CASES = {
    "SGDGC": lambda: kgo.SGDGC(learning_rate=1.0, global_clipnorm=1.0),
    "SGDWGCC-momentum": lambda: kgo.SGDWGCC(learning_rate=1.0, global_clipnorm=1.0, momentum=0.9),
    "AdamGC": lambda: kgo.AdamGC(learning_rate=1.0, global_clipnorm=1.0, beta_1=0.0, beta_2=0.0,
                                 epsilon=1e-30),
    "CentralizedSGD": lambda: kgo.with_gradient_centralization(
        keras.optimizers.SGD(learning_rate=1.0, global_clipnorm=1.0)),
}


def _check_global_clipnorm_clips_the_aggregated_gradient(strategy, name):
    optimizer, (var,) = _run_on_two_replicas(
        strategy, GLOBAL_CLIP_CASES[name], [np.zeros(2, np.float32)],
        [(np.array([3.0, 0.0], np.float32), np.array([0.0, 4.0], np.float32))])
    if name == "AdamGC":
        # beta_1 = beta_2 = 0: the first Adam step is lr * g / |g| per element (its sign).
        np.testing.assert_allclose(var.numpy(), [-1.0, -1.0], rtol=1e-6, err_msg=name)
    else:
        np.testing.assert_allclose(var.numpy(), [-0.6, -0.8], rtol=1e-6, err_msg=name)
    for component in var.value.values:  # every replica's copy is the same
        np.testing.assert_allclose(component.numpy(), var.numpy(), err_msg=name)
    np.testing.assert_allclose(optimizer.grad_norm.numpy(), 5.0, rtol=1e-6, err_msg=name)


def _check_centralization_and_clipping_act_on_the_sum_of_replica_gradients(strategy):
    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    per_replica = [(rng.normal(size=s).astype(np.float32) + 1, rng.normal(size=s).astype(np.float32))
                   for s in [(4, 3), (3,)]]
    _, variables = _run_on_two_replicas(
        strategy, lambda: kgo.SGDGC(learning_rate=0.5, clipnorm=1.0), [kernel, bias], per_replica)
    for var, w0, (a, b) in zip(variables, [kernel, bias], per_replica):
        total = (a + b).astype(np.float64)
        clipped = total * 1.0 / max(np.linalg.norm(total), 1.0)
        np.testing.assert_allclose(var.numpy(), w0 - 0.5 * np_gc(clipped), rtol=1e-5, atol=1e-6)


def _check_skip_nonfinite_sees_a_nan_on_any_replica(strategy):
    initial = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    good, bad = np.ones((2, 2), np.float32), np.array([[1.0, 1.0], [np.inf, 1.0]], np.float32)
    optimizer, (var,) = _run_on_two_replicas(
        strategy, lambda: kgo.AdamGC(learning_rate=0.1, skip_nonfinite=True),
        [initial], [(good, bad)], steps=2)
    for component in var.value.values:
        np.testing.assert_array_equal(component.numpy(), initial)
    assert int(optimizer.skipped_steps.numpy()) == 2
    assert int(optimizer.iterations.numpy()) == 0  # a skipped step does not advance it


def test_mirrored_strategy(two_replica_strategy):
    """All tf.distribute checks share one strategy: separate MirroredStrategy
    instances in one process reuse collective instance keys, and all-reduces
    of different shapes then collide (a TensorFlow limitation)."""
    for name in GLOBAL_CLIP_CASES:
        _check_global_clipnorm_clips_the_aggregated_gradient(two_replica_strategy, name)
    _check_centralization_and_clipping_act_on_the_sum_of_replica_gradients(two_replica_strategy)
    _check_skip_nonfinite_sees_a_nan_on_any_replica(two_replica_strategy)


# ---------------------------------------------------------------- accumulation, EMA


def test_gradient_accumulation_updates_with_the_clipped_centralized_mean():
    rng = np.random.default_rng(1)
    initial = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
    steps = [[(rng.normal(size=w.shape) + 1).astype(np.float32) for w in initial] for _ in range(4)]
    variables = [keras.Variable(w) for w in initial]
    optimizer = kgo.SGDGC(learning_rate=0.5, momentum=0.5, global_clipnorm=1.0, gradient_accumulation_steps=2)
    optimizer.build(variables)
    apply = tf.function(lambda g: optimizer.apply(g, variables))
    expected = [w.astype(np.float64) for w in initial]
    momentum = [np.zeros_like(w) for w in expected]
    for i, grads in enumerate(steps):
        apply([tf.constant(g) for g in grads])
        if i % 2 == 0:  # accumulating: nothing moves
            for var, w in zip(variables, expected):
                np.testing.assert_allclose(var.numpy(), w, rtol=1e-6)
            continue
        mean = [(a + b) / 2 for a, b in zip(steps[i - 1], grads)]
        clipped, norm = np_global_clip(mean, 1.0)
        for j, g in enumerate(clipped):
            momentum[j] = 0.5 * momentum[j] - 0.5 * np_gc(g)
            expected[j] = expected[j] + momentum[j]
        for var, w in zip(variables, expected):
            np.testing.assert_allclose(var.numpy(), w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(optimizer.grad_norm.numpy(), norm, rtol=1e-5)


def test_ema_averages_the_centralized_trajectory():
    rng = np.random.default_rng(2)
    initial = rng.normal(size=(4, 3)).astype(np.float32)
    steps = [(rng.normal(size=(4, 3)) + 1).astype(np.float32) for _ in range(3)]
    var = keras.Variable(initial)
    optimizer = kgo.SGDWGC(learning_rate=0.1, weight_decay=0.1, use_ema=True, ema_momentum=0.5)
    optimizer.build([var])
    apply = tf.function(lambda g: optimizer.apply([g], [var]))
    w, average = initial.astype(np.float64), None
    for g in steps:
        apply(tf.constant(g))
        w = w - 0.1 * 0.1 * w - 0.1 * np_gc(g)
        average = w if average is None else 0.5 * average + 0.5 * w  # Keras: first step copies
    np.testing.assert_allclose(var.numpy(), w, rtol=1e-5)
    optimizer.finalize_variable_values([var])  # what fit() does at the end with use_ema
    np.testing.assert_allclose(var.numpy(), average, rtol=1e-5)


# ---------------------------------------------------------------- mixed precision through model.fit


def _dense_model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(4), keras.layers.Dense(2, dtype="float32"),
    ])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_mixed_float16_fit_applies_unscaled_centralized_gradient(jit_compile):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    y = rng.normal(size=(16, 2)).astype(np.float32)
    reference = _dense_model(seed=4)
    before = [w.numpy() for w in reference.trainable_variables]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(reference(x) - y))
    grads = [g.numpy() for g in tape.gradient(loss, reference.trainable_variables)]
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _dense_model(seed=4)
        model.compile(optimizer=kgo.SGDGC(learning_rate=0.1), loss="mse", jit_compile=jit_compile)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, kgo.SGDGC)
    assert model.layers[0].compute_dtype == "float16"
    for var, w0, g in zip(model.trainable_variables, before, grads):
        assert var.dtype == "float32"
        delta = var.numpy() - w0
        np.testing.assert_allclose(delta, -0.1 * np_gc(g), rtol=2e-2, atol=2e-4, err_msg=var.path)
        if g.ndim > 1:
            np.testing.assert_allclose(delta.mean(axis=0), 0.0, atol=1e-6)


# ---------------------------------------------------------------- .keras save / load / resume


def _conv_model():
    keras.utils.set_random_seed(5)
    return keras.Sequential([
        keras.Input((5, 5, 2)), keras.layers.Conv2D(3, 3, name="conv"),
        keras.layers.Conv2DTranspose(2, 2, name="up"), keras.layers.Flatten(),
        keras.layers.Dense(2, name="head"),
    ])


def _schedule():
    return keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.5)


OPTIMIZERS = {
    "SGDGC": lambda model: kgo.SGDGC(learning_rate=_schedule(), momentum=0.9, nesterov=True,
                                     weight_decay=1e-3, fan_in_axes=kgo.fan_in_axes(model)),
    "AdamWGC-update": lambda model: kgo.AdamWGC(learning_rate=1e-2, amsgrad=True, centralization="update",
                                                global_clipnorm=1.0, skip_nonfinite=True,
                                                fan_in_axes=kgo.fan_in_axes(model)),
    "AdagradGCC": lambda model: kgo.AdagradGCC(learning_rate=0.05, clipnorm=1.0, weight_decay=1e-3),
    "CentralizedLion": lambda model: kgo.with_gradient_centralization(
        keras.optimizers.Lion(learning_rate=1e-3), conv_only=True, fan_in_axes=kgo.fan_in_axes(model)),
}


@pytest.mark.parametrize("name,policy", [(name, "float32") for name in OPTIMIZERS]
                         + [("AdamWGC-update", "mixed_float16")])
def test_save_load_restores_optimizer_and_resumes_identically(name, policy, tmp_path):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(8, 5, 5, 2)).astype(np.float32)
    y = rng.normal(size=(8, 2)).astype(np.float32)
    path = str(tmp_path / "model.keras")
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = _conv_model()
        model.compile(optimizer=OPTIMIZERS[name](model), loss="mse")
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        model.save(path)
        saved_state = [v.numpy() for v in model.optimizer.variables]
        # Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer.
        saved_config = getattr(model.optimizer, "inner_optimizer", model.optimizer).get_config()
        saved_iterations = int(model.optimizer.iterations.numpy())
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)  # uninterrupted

        loaded = keras.saving.load_model(path)
        assert type(loaded.optimizer) is type(model.optimizer)
        restored = getattr(loaded.optimizer, "inner_optimizer", loaded.optimizer)
        assert type(restored) is type(getattr(model.optimizer, "inner_optimizer", model.optimizer))
        assert restored.get_config() == saved_config
        assert len(loaded.optimizer.variables) == len(saved_state)
        for v, saved in zip(loaded.optimizer.variables, saved_state):
            np.testing.assert_array_equal(v.numpy(), saved, err_msg=v.path)
        assert int(loaded.optimizer.iterations.numpy()) == saved_iterations > 0
        loaded.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)  # resumed
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for resumed, uninterrupted in zip(loaded.weights, model.weights):
        np.testing.assert_allclose(resumed.numpy(), uninterrupted.numpy(), rtol=1e-6, atol=1e-7)
