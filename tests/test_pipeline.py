"""The gradient chain against NumPy: clip, then L2, then centralize; and the non-finite guard."""

import doctest

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_gradops.pipeline import centralization, chain, clipping, guard


def np_global_clip(grads, c):
    norm = np.sqrt(sum(np.sum(g * g) for g in grads))
    return [g * c / max(norm, c) for g in grads], norm


def np_agc(g, w, lam, eps, axes):
    axes = tuple(axes) if axes else None
    w_norm = np.maximum(np.sqrt(np.sum(w * w, axis=axes, keepdims=True)), eps)
    g_norm = np.maximum(np.sqrt(np.sum(g * g, axis=axes, keepdims=True)), 1e-6)
    return g * np.minimum(1.0, lam * w_norm / g_norm)


@pytest.fixture
def weights_and_gradients():
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 2, 4), (5, 4), (4,)]  # Conv2D kernel, Dense kernel, bias
    weights = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [(rng.normal(size=s) + rng.normal(size=s[-1:])).astype(np.float32) * 3 for s in shapes]
    return weights, grads


@pytest.mark.parametrize("rule", ["global", "agc"])
@pytest.mark.parametrize("conv_only", [False, True])
def test_chain_is_clip_then_l2_then_centralize(weights_and_gradients, rule, conv_only):
    weights, grads = weights_and_gradients
    variables = [keras.Variable(w) for w in weights]
    options = {"global_clipnorm": 2.0} if rule == "global" else {"adaptive_clipping": 0.05}
    gradient_chain = chain.GradientChain(clipping.clipping_from_options(**options), centralize=True,
                                         conv_only=conv_only, l2=0.1)
    gradient_chain.build(variables)
    got, statistics = gradient_chain([tf.constant(g) for g in grads], variables, [0, 1, 2])

    axes = [(0, 1, 2), (0,), None]
    if rule == "global":
        expected, norm = np_global_clip(grads, 2.0)
    else:
        expected = [np_agc(g, w, 0.05, 1e-3, a if w.ndim > 1 else ()) for g, w, a in zip(grads, weights, axes)]
        norm = np.sqrt(sum(np.sum(g * g) for g in grads))
    expected = [g + 0.1 * w for g, w in zip(expected, weights)]
    for i, a in enumerate(axes):
        if a is not None and not (conv_only and weights[i].ndim < 4):
            expected[i] = expected[i] - expected[i].mean(axis=a, keepdims=True)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(statistics.norm), norm, rtol=1e-6)
    assert bool(statistics.clipped)
    assert (statistics.threshold is None) == (rule == "agc")


@pytest.mark.parametrize("norm, replicas, safe", [
    (1.0, 1, True), (float("nan"), 1, False), (float("inf"), 1, False),
    (0.9 * guard.SAFE_NORM, 1, True), (1.1 * guard.SAFE_NORM, 1, False),
])
def test_a_gradient_is_safe_when_finite_and_below_the_overflow_bound(norm, replicas, safe):
    assert bool(guard.is_safe([tf.constant([norm], tf.float32)])) is safe


def test_twice_the_safe_norm_squared_is_finite_in_float32():
    assert np.isfinite(np.float32(2 * guard.SAFE_NORM) ** 2)


@pytest.mark.parametrize("module", [chain, clipping, centralization])
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"tf": tf, "keras": keras, "np": np})
    assert result.attempted > 0 and result.failed == 0
