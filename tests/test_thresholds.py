"""AutoClip and ZClip against NumPy reimplementations, on the wrapper and on an optimizer.

A one-weight model whose gradient is chosen per step: ``y = w * x`` with the
per-example loss ``y``, so the gradient of a batch ``[[g]]`` is ``g``. SGD
with learning rate 1 moves ``w`` by minus the clipped gradient.
"""

import doctest

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_gradops as kgo
from keras_gradops import thresholds

GRADIENTS = [2.0, -3.0, 1.0, 40.0, float("nan"), -2.5, 0.5, -60.0, 3.0, 1.5, 2.0, -30.0]


# ---------------------------------------------------------------- NumPy reimplementations


def numpy_autoclip(norms, quantile, history):
    """The issue's rule: numpy.quantile of the last ``history`` finite norms, n_t included."""
    kept, out = [], []
    for n in norms:
        if np.isfinite(n):
            kept = (kept + [n])[-history:]
        out.append(np.quantile(kept, quantile) if kept else np.inf)
    return out


def numpy_zclip(norms, z_thresh=2.5, alpha=0.97, warmup=25, max_norm=1.0, eps=1e-6, mode="zscore",
                clip_option="adaptive_scaling", clip_factor=1.0, skip_update_on_spike=False):
    """The reference ``zclip/zclip.py`` step by step: the threshold the gradient is clipped at."""
    cap = np.inf if max_norm is None else max_norm
    buffer, mean, var, out = [], None, None, []
    for n in norms:
        if not np.isfinite(n):
            out.append(cap if mean is None else (cap if mode == "zscore" else min(mean + z_thresh * np.sqrt(var), cap)))
            continue
        if mean is None:
            buffer.append(n)
            if len(buffer) >= warmup:
                mean = sum(buffer) / len(buffer)
                var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
            out.append(cap)
            continue
        std = np.sqrt(var)
        clip_val = None
        if mode == "percentile":
            threshold = mean + z_thresh * std
            out.append(min(threshold, cap))
            if n > threshold:
                clip_val = threshold
        else:
            z = (n - mean) / (std + eps)
            if z > z_thresh:
                clip_val = (mean + z_thresh * std / (z / z_thresh)) * clip_factor if clip_option == "adaptive_scaling" \
                    else mean
            out.append(min(clip_val, cap) if clip_val is not None else cap)
        if clip_val is not None and skip_update_on_spike:
            continue
        x = clip_val if clip_val is not None else n
        mean = alpha * mean + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mean) ** 2
    return out


def expected_weight(gradients, threshold_values, w0=0.0):
    w = w0
    for g, t in zip(gradients, threshold_values):
        if np.isfinite(g):
            w -= g * min(1.0, t / abs(g)) if g else 0.0
    return w


# ---------------------------------------------------------------- the one-weight model


def one_weight_net():
    return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])


def per_example_output(y_true, y_pred):
    return y_pred[:, 0]


def wrapper_run(threshold, gradients, save_after=None, tmp_path=None):
    model = kgo.GradientOpsModel(one_weight_net(), global_clipnorm=threshold, skip_nonfinite=True)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=per_example_output)
    logged = []
    for step, g in enumerate(gradients):
        if step == save_after:
            path = str(tmp_path / "resumed.keras")
            model.save(path)
            model = keras.saving.load_model(path, custom_objects={"per_example_output": per_example_output})
        model.reset_metrics()  # this step's logs alone (Keras 3.15 resets in train_on_batch, 3.10 does not)
        logs = model.train_on_batch(np.array([[g]], np.float32), np.zeros((1, 1), np.float32), return_dict=True)
        logged.append(logs.get("clip_threshold"))
    return float(model.model.get_weights()[0][0, 0]), logged, model


def optimizer_run(make_optimizer, gradients):
    weight = keras.Variable(np.zeros((1, 1), np.float32), name="kernel")
    optimizer = make_optimizer()
    optimizer.build([weight])
    step = tf.function(lambda g: optimizer.apply([g], [weight]))
    logged = []
    for g in gradients:
        step(tf.constant([[g]], tf.float32))
        logged.append(float(optimizer.grad_clip_threshold.numpy()))
    return float(weight.numpy()[0, 0]), logged, optimizer


def applied_thresholds(logged, gradients):
    """The logged value of each applied (finite) step; a skipped step keeps the previous value."""
    return [t for t, g in zip(logged, gradients) if np.isfinite(g)]


# ---------------------------------------------------------------- AutoClip


@pytest.mark.parametrize("quantile, history", [(0.1, 1000), (0.5, 4), (0.9, 3)])
def test_autoclip_on_the_wrapper_matches_numpy(quantile, history):
    expected = numpy_autoclip([abs(g) for g in GRADIENTS], quantile, history)
    weight, logged, _ = wrapper_run(kgo.AutoClip(quantile=quantile, history=history), GRADIENTS)
    np.testing.assert_allclose(applied_thresholds(logged, GRADIENTS), applied_thresholds(expected, GRADIENTS),
                               rtol=1e-6)
    np.testing.assert_allclose(weight, expected_weight(GRADIENTS, expected), rtol=1e-5)


def test_autoclip_on_an_optimizer_matches_numpy():
    expected = numpy_autoclip([abs(g) for g in GRADIENTS], 0.5, 4)
    make = lambda: kgo.SGDGC(learning_rate=1.0, global_clipnorm=kgo.AutoClip(0.5, 4), skip_nonfinite=True)  # noqa: E731
    weight, logged, optimizer = optimizer_run(make, GRADIENTS)
    np.testing.assert_allclose(applied_thresholds(logged, GRADIENTS), applied_thresholds(expected, GRADIENTS),
                               rtol=1e-6)
    np.testing.assert_allclose(weight, expected_weight(GRADIENTS, expected), rtol=1e-5)
    assert int(optimizer.skipped_steps.numpy()) == 1


def test_autoclip_state_resumes_from_a_keras_file(tmp_path):
    threshold = lambda: kgo.AutoClip(quantile=0.5, history=4)  # noqa: E731
    uninterrupted, logged, _ = wrapper_run(threshold(), GRADIENTS)
    resumed, logged_resumed, model = wrapper_run(threshold(), GRADIENTS, save_after=6, tmp_path=tmp_path)
    assert resumed == pytest.approx(uninterrupted, rel=1e-6)
    np.testing.assert_allclose(applied_thresholds(logged_resumed, GRADIENTS),
                               applied_thresholds(logged, GRADIENTS), rtol=1e-6)
    assert isinstance(model.gradient_chain.clipping.value, kgo.AutoClip)


def test_autoclip_state_of_an_optimizer_resumes_from_a_keras_file(tmp_path):
    def fit(model, gradients):
        for g in gradients:
            model.train_on_batch(np.array([[g]], np.float32), np.zeros((1, 1), np.float32))

    def compiled():
        net = one_weight_net()
        net.compile(optimizer=kgo.SGDGC(learning_rate=1.0, global_clipnorm=kgo.AutoClip(0.5, 4), skip_nonfinite=True),
                    loss=per_example_output)
        return net

    reference = compiled()
    fit(reference, GRADIENTS)
    first = compiled()
    fit(first, GRADIENTS[:6])
    first.save(str(tmp_path / "net.keras"))
    second = keras.saving.load_model(str(tmp_path / "net.keras"), custom_objects={"per_example_output": per_example_output})
    fit(second, GRADIENTS[6:])
    np.testing.assert_allclose(second.get_weights()[0], reference.get_weights()[0], rtol=1e-6)
    assert float(second.optimizer.grad_clip_threshold.numpy()) == pytest.approx(
        float(reference.optimizer.grad_clip_threshold.numpy()), rel=1e-6)


# ---------------------------------------------------------------- ZClip


ZCLIP_CASES = {
    "defaults, warm-up 3": dict(warmup_steps=3),
    "no cap": dict(warmup_steps=3, max_norm=None),
    "mean option": dict(warmup_steps=2, max_norm=None, clip_option="mean"),
    "percentile": dict(warmup_steps=2, max_norm=50.0, mode="percentile", z_threshold=1.0),
    "skip update on spike, factor": dict(warmup_steps=2, max_norm=None, skip_update_on_spike=True,
                                         clip_factor=0.8, alpha=0.9),
}


def _numpy_zclip_arguments(kwargs):
    names = {"z_threshold": "z_thresh", "warmup_steps": "warmup"}
    return {names.get(k, k): v for k, v in kwargs.items()}


@pytest.mark.parametrize("case", sorted(ZCLIP_CASES))
def test_zclip_on_the_wrapper_matches_the_reference_step_by_step(case):
    kwargs = ZCLIP_CASES[case]
    expected = numpy_zclip([abs(g) for g in GRADIENTS], **_numpy_zclip_arguments(kwargs))
    weight, logged, _ = wrapper_run(kgo.ZClip(**kwargs), GRADIENTS)
    got = np.minimum(applied_thresholds(logged, GRADIENTS), 1e30)
    np.testing.assert_allclose(got, np.minimum(applied_thresholds(expected, GRADIENTS), 1e30), rtol=1e-5)
    np.testing.assert_allclose(weight, expected_weight(GRADIENTS, expected), rtol=1e-5)


def test_zclip_on_an_optimizer_with_reference_defaults():
    gradients = list(np.random.default_rng(3).normal(1.0, 0.2, size=40)) + [30.0, 1.0, 25.0]
    expected = numpy_zclip([abs(g) for g in gradients])
    make = lambda: kgo.SGDWGC(learning_rate=1.0, global_clipnorm=kgo.ZClip())  # noqa: E731
    weight, logged, _ = optimizer_run(make, gradients)
    np.testing.assert_allclose(logged, expected, rtol=1e-5)
    np.testing.assert_allclose(weight, expected_weight(gradients, expected), rtol=1e-4)


# ---------------------------------------------------------------- under a distribution strategy


def test_the_threshold_comes_from_the_aggregated_norm(two_replica_strategy):
    """Replicas see x = [6, 0] and [0, 8] (norm 5 in sum; 3 and 4 alone), then twice that."""
    x = np.array([[6.0, 0.0], [0.0, 8.0]], np.float32)
    with two_replica_strategy.scope():
        net = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
        model = kgo.GradientOpsModel(net, global_clipnorm=kgo.AutoClip(quantile=0.5, history=10))
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss=per_example_output, jit_compile=False)
    logged = []
    for scale in (1.0, 2.0):
        model.reset_metrics()  # this step's logs alone (Keras 3.15 resets in train_on_batch, 3.10 does not)
        logs = model.train_on_batch(x * scale, np.zeros((2, 1), np.float32), return_dict=True)
        logged.append(logs["clip_threshold"])
    # Norms of the aggregated gradient: 5, then 10; median of [5] is 5, of [5, 10] is 7.5.
    np.testing.assert_allclose(logged, [5.0, 7.5], rtol=1e-6)
    step1 = np.array([3.0, 4.0])
    step2 = np.array([6.0, 8.0]) * 7.5 / 10.0
    np.testing.assert_allclose(net.get_weights()[0].ravel(), -(step1 + step2), rtol=1e-6)


# ---------------------------------------------------------------- arguments and docs


@pytest.mark.parametrize("make, name", [
    (lambda: kgo.AutoClip(quantile=1.5), "quantile"),
    (lambda: kgo.AutoClip(quantile=-0.1), "quantile"),
    (lambda: kgo.AutoClip(history=0), "history"),
    (lambda: kgo.AutoClip(history=2.5), "history"),
    (lambda: kgo.ZClip(z_threshold=0.0), "z_threshold"),
    (lambda: kgo.ZClip(z_threshold=-1.0), "z_threshold"),
    (lambda: kgo.ZClip(alpha=1.0), "alpha"),
    (lambda: kgo.ZClip(warmup_steps=0), "warmup_steps"),
    (lambda: kgo.ZClip(mode="median"), "mode"),
    (lambda: kgo.ZClip(clip_option="max"), "clip_option"),
    (lambda: kgo.ZClip(max_norm=-1.0), "max_norm"),
])
def test_bad_arguments_raise_value_errors_naming_them(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_one_threshold_serves_one_model():
    shared = kgo.AutoClip()
    kgo.GradientOpsModel(one_weight_net(), global_clipnorm=shared)
    with pytest.raises(ValueError, match="its own"):
        kgo.SGDGC(learning_rate=0.1, global_clipnorm=shared).build([keras.Variable(np.zeros((2, 2), np.float32))])


def test_with_gradient_centralization_takes_a_threshold():
    optimizer = kgo.with_gradient_centralization(keras.optimizers.SGD(1.0, global_clipnorm=kgo.AutoClip(0.5, 4)))
    weight = keras.Variable(np.zeros((3, 1), np.float32))
    optimizer.apply([tf.constant([[4.0], [0.0], [-4.0]])], [weight])
    assert float(optimizer.grad_clip_threshold.numpy()) == pytest.approx(np.sqrt(32.0))


def test_docstring_examples():
    result = doctest.testmod(thresholds, extraglobs={"tf": tf, "keras": keras, "np": np})
    assert result.attempted > 0 and result.failed == 0
