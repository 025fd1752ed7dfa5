"""keras_gradops.ops against independent NumPy implementations.

Covers every op on dense tensors, ``None`` entries and ``tf.IndexedSlices``,
float16/bfloat16 inputs (reduced in float32), bad arguments, the ops inside
``tf.function(jit_compile=True)``, and the ``>>>`` examples of the ops modules.
"""

import doctest

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_gradops import ops
from keras_gradops.ops import adaptive_clipping, centralization, clipping, finite

RNG = np.random.default_rng(0)


def rand(*shape, scale=1.0):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def sparse(values, indices, dense_shape):
    return tf.IndexedSlices(
        tf.constant(values), tf.constant(indices, tf.int64), tf.constant(dense_shape, tf.int64)
    )


def dense(gradient):
    """A gradient as a NumPy array (IndexedSlices scattered, duplicates summed)."""
    return tf.convert_to_tensor(gradient).numpy()


# ---------------------------------------------------------------- NumPy references


def np_global_norm(arrays):
    return np.sqrt(sum(np.sum(np.square(a.astype(np.float64))) for a in arrays))


def np_clip_by_norm(a, c):
    n = np.sqrt(np.sum(np.square(a.astype(np.float64))))
    return a * c / max(n, c)


def np_centralize(g, axes):
    return g - g.mean(axis=tuple(axes), keepdims=True)


def np_agc(g, w, lam, eps, axes):
    """Brock et al. 2021, per unit i: if ||G_i|| / max(||W_i||, eps) > lam,
    G_i <- lam * max(||W_i||, eps) * G_i / max(||G_i||, 1e-6)."""
    g = g.astype(np.float64)
    w = w.astype(np.float64)
    axes = tuple(range(w.ndim)) if w.ndim <= 1 else tuple(axes)
    w_norm = np.maximum(np.sqrt(np.sum(w**2, axis=axes, keepdims=True)), eps)
    g_norm = np.sqrt(np.sum(g**2, axis=axes, keepdims=True))
    trigger = g_norm / w_norm > lam
    clipped = g * (lam * w_norm / np.maximum(g_norm, 1e-6))
    return np.where(trigger, clipped, g)


# ---------------------------------------------------------------- norms and clipping


def test_global_norm_skips_none_and_counts_sparse_values():
    a, b = rand(3, 2), rand(4)
    slices = sparse(rand(2, 2), [0, 0], [5, 2])  # duplicate index: TF counts values, not the sum
    expected = np_global_norm([a, b, slices.values.numpy()])
    norm = ops.global_norm([tf.constant(a), None, tf.constant(b), slices])
    assert norm.dtype == tf.float32
    np.testing.assert_allclose(float(norm), expected, rtol=1e-6)
    assert float(ops.global_norm([None, None])) == 0.0
    assert float(ops.global_norm([])) == 0.0


@pytest.mark.parametrize("jit_compile", [False, True])
def test_global_norm_of_every_rank_and_dtype_matches_numpy(jit_compile):
    """Scalars, vectors, conv kernels, float16, and a last axis unknown when traced."""
    arrays = [np.float32(rand(1)[0]), rand(5), rand(3, 3, 2, 4), rand(7, 3).astype(np.float16)]
    unknown_last = rand(2, 6)
    norm = tf.function(
        lambda *g: ops.global_norm(list(g)), jit_compile=jit_compile,
        input_signature=[tf.TensorSpec(np.shape(a), tf.as_dtype(np.asarray(a).dtype)) for a in arrays]
        + [tf.TensorSpec([2, None], tf.float32)],
    )(*[tf.constant(a) for a in arrays], tf.constant(unknown_last))
    expected = np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64))) for a in arrays + [unknown_last]))
    np.testing.assert_allclose(float(norm), expected, rtol=1e-5)


@pytest.mark.parametrize("clip_norm", [0.5, 100.0])
def test_clip_by_global_norm_matches_numpy_and_returns_pre_clip_norm(clip_norm):
    a, b = rand(3, 2), rand(4)
    slices = sparse(rand(2, 2), [1, 3], [5, 2])
    grads = [tf.constant(a), None, tf.constant(b), slices]
    clipped, norm = ops.clip_by_global_norm(grads, clip_norm)
    n = np_global_norm([a, b, slices.values.numpy()])
    scale = clip_norm / max(n, clip_norm)
    np.testing.assert_allclose(float(norm), n, rtol=1e-6)
    assert clipped[1] is None
    np.testing.assert_allclose(clipped[0].numpy(), a * scale, rtol=1e-5)
    np.testing.assert_allclose(clipped[2].numpy(), b * scale, rtol=1e-5)
    assert isinstance(clipped[3], tf.IndexedSlices)
    np.testing.assert_array_equal(clipped[3].indices.numpy(), [1, 3])
    np.testing.assert_allclose(clipped[3].values.numpy(), slices.values.numpy() * scale, rtol=1e-5)


def test_clip_by_global_norm_nonfinite_norm_gives_nan_like_tensorflow():
    clipped, norm = ops.clip_by_global_norm([tf.constant([1.0, np.inf]), tf.constant([2.0])], 1.0)
    assert not np.isfinite(float(norm))
    assert np.all(np.isnan(clipped[0].numpy())) and np.all(np.isnan(clipped[1].numpy()))


def test_clip_by_norm_clips_each_tensor_independently():
    big, small = rand(3, 4, scale=10.0), rand(5, scale=0.01)
    slices = sparse(rand(2, 3, scale=10.0), [0, 2], [4, 3])
    out = ops.clip_by_norm([tf.constant(big), None, tf.constant(small), slices], 1.5)
    assert out[1] is None
    np.testing.assert_allclose(out[0].numpy(), np_clip_by_norm(big, 1.5), rtol=1e-5)
    np.testing.assert_allclose(out[2].numpy(), small, rtol=1e-6)
    assert isinstance(out[3], tf.IndexedSlices)
    np.testing.assert_allclose(out[3].values.numpy(), np_clip_by_norm(slices.values.numpy(), 1.5), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out[0].numpy()), 1.5, rtol=1e-5)


def test_clip_by_value_clips_elements():
    a = rand(4, 3, scale=3.0)
    slices = sparse(rand(2, 3, scale=3.0), [0, 1], [4, 3])
    out = ops.clip_by_value([tf.constant(a), None, slices], 0.7)
    assert out[1] is None
    np.testing.assert_array_equal(out[0].numpy(), np.clip(a, -0.7, 0.7))
    assert isinstance(out[2], tf.IndexedSlices)
    np.testing.assert_array_equal(out[2].values.numpy(), np.clip(slices.values.numpy(), -0.7, 0.7))


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_norms_of_low_precision_gradients_are_computed_in_float32(dtype):
    # 300^2 + 400^2 = 250000 overflows float16 (max 65504): a float16 norm would be inf.
    g = tf.constant([300.0, 400.0], dtype)
    assert float(ops.global_norm([g])) == pytest.approx(500.0, rel=1e-3)
    clipped, norm = ops.clip_by_global_norm([g], 1.0)
    assert float(norm) == pytest.approx(500.0, rel=1e-3)
    (per_tensor,) = ops.clip_by_norm([g], 1.0)
    for out in (clipped[0], per_tensor):
        assert out.dtype == dtype
        np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), [0.6, 0.8], rtol=1e-2)


@pytest.mark.parametrize("op", [ops.clip_by_global_norm, ops.clip_by_norm, ops.clip_by_value])
@pytest.mark.parametrize("bad", [0, -1.0, True, "1", None])
def test_clipping_thresholds_must_be_positive_numbers(op, bad):
    with pytest.raises(ValueError, match="clip_(norm|value)"):
        op([tf.constant([1.0])], bad)


# ---------------------------------------------------------------- finiteness


def test_all_finite():
    assert bool(ops.all_finite([tf.constant([1.0, 2.0]), None, sparse([[1.0]], [0], [3, 1])]))
    assert not bool(ops.all_finite([tf.constant([1.0]), tf.constant([[np.inf]])]))
    assert not bool(ops.all_finite([sparse([[np.nan]], [2], [3, 1])]))
    assert not bool(ops.all_finite([tf.constant([-np.inf], tf.float16)]))
    assert bool(ops.all_finite([None]))
    assert bool(ops.all_finite([]))


# ---------------------------------------------------------------- centralization


@pytest.mark.parametrize("shape,axes", [((4, 3), (0,)), ((3, 3, 2, 5), (0, 1, 2)), ((3, 3, 5, 2), (0, 1, 3))])
def test_centralize_subtracts_the_mean_over_the_given_axes(shape, axes):
    g = rand(*shape)
    out = ops.centralize(tf.constant(g), axes).numpy()
    np.testing.assert_allclose(out, np_centralize(g, axes), atol=1e-6)
    np.testing.assert_allclose(out.mean(axis=axes), 0.0, atol=1e-6)


def test_centralize_leaves_none_sparse_and_empty_axes_alone():
    slices = sparse(rand(2, 3), [0, 2], [4, 3])
    assert ops.centralize(slices, (0,)) is slices  # never densified
    assert ops.centralize(None, (0,)) is None
    g = tf.constant(rand(4, 3))
    assert ops.centralize(g, ()) is g
    assert ops.centralize(g, None) is g


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_centralize_low_precision_in_float32(dtype):
    # The sum 4 * 30000 overflows float16: a float16 mean would be inf/NaN.
    g32 = np.array([[30000.0, 1.0], [30000.0, 3.0], [30000.0, 5.0], [29984.0, 7.0]], np.float32)
    g = tf.cast(tf.constant(g32), dtype)
    out = ops.centralize(g, (0,))
    assert out.dtype == dtype
    expected = np_centralize(tf.cast(g, tf.float32).numpy(), (0,))
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), expected, atol=0.05)


def test_centralization_axes_rules():
    dense_kernel = keras.Variable(np.zeros((4, 3), np.float32), name="dense_kernel")
    conv_kernel = keras.Variable(np.zeros((3, 3, 2, 5), np.float32), name="conv_kernel")
    bias = keras.Variable(np.zeros((3,), np.float32), name="bias")
    one_input = keras.Variable(np.zeros((1, 6), np.float32), name="one_input")
    gru_bias = keras.Variable(np.zeros((2, 6), np.float32), name="bias")
    assert ops.centralization_axes(dense_kernel) == (0,)
    assert ops.centralization_axes(conv_kernel) == (0, 1, 2)
    assert ops.centralization_axes(bias) is None
    assert ops.centralization_axes(one_input) is None  # a 1-weight fan-in would be zeroed
    assert ops.centralization_axes(gru_bias) is None  # a bias, whatever its rank
    assert ops.centralization_axes(dense_kernel, conv_only=True) is None
    assert ops.centralization_axes(conv_kernel, conv_only=True) == (0, 1, 2)
    mapping = {conv_kernel.path: (0, 1, 3), dense_kernel.path: None}
    assert ops.centralization_axes(conv_kernel, fan_in_axes=mapping) == (0, 1, 3)
    assert ops.centralization_axes(dense_kernel, fan_in_axes=mapping) is None


def test_centralize_gradients_over_a_list():
    kernel = keras.Variable(rand(4, 3), name="k")
    conv = keras.Variable(rand(2, 2, 3, 4), name="c")
    bias = keras.Variable(rand(3), name="b")
    emb = keras.Variable(rand(5, 2), name="e")
    gk, gc, gb = rand(4, 3), rand(2, 2, 3, 4), rand(3)
    ge = sparse(rand(2, 2), [1, 4], [5, 2])
    out = ops.centralize_gradients(
        [tf.constant(gk), tf.constant(gc), tf.constant(gb), ge, None],
        [kernel, conv, bias, emb, kernel],
    )
    np.testing.assert_allclose(out[0].numpy(), np_centralize(gk, (0,)), atol=1e-6)
    np.testing.assert_allclose(out[1].numpy(), np_centralize(gc, (0, 1, 2)), atol=1e-6)
    np.testing.assert_array_equal(out[2].numpy(), gb)
    assert out[3] is ge and out[4] is None
    conv_only = ops.centralize_gradients([tf.constant(gk), tf.constant(gc)], [kernel, conv], conv_only=True)
    np.testing.assert_array_equal(conv_only[0].numpy(), gk)
    np.testing.assert_allclose(conv_only[1].numpy(), np_centralize(gc, (0, 1, 2)), atol=1e-6)
    with pytest.raises(ValueError, match="gradients.*variables"):
        ops.centralize_gradients([tf.constant(gk)], [kernel, conv])


# ---------------------------------------------------------------- adaptive clipping


def test_adaptive_clip_matches_brock_et_al():
    kernel = rand(6, 4)
    conv = rand(3, 3, 2, 4, scale=0.1)
    bias = rand(4)
    zeros = np.zeros((5, 3), np.float32)  # eps floor: zero weights may still move
    # Dense units alternate between large and tiny gradients: some clipped, some not.
    g_kernel = rand(6, 4) * np.array([10.0, 1e-4, 3.0, 1e-3], np.float32)
    g_conv, g_bias, g_zeros = rand(3, 3, 2, 4), rand(4, scale=1e-4), rand(5, 3)
    variables = [keras.Variable(x) for x in (kernel, conv, bias, zeros)]
    grads = [g_kernel, g_conv, g_bias, g_zeros]
    out = ops.adaptive_clip([tf.constant(g) for g in grads] + [None], variables + [variables[0]],
                            clipping=0.05, eps=1e-3)
    assert out[-1] is None
    for got, g, w, axes in zip(out, grads, (kernel, conv, bias, zeros), [(0,), (0, 1, 2), (), (0,)]):
        np.testing.assert_allclose(got.numpy(), np_agc(g, w, 0.05, 1e-3, axes), rtol=1e-5, atol=1e-8)
    ratio = np.linalg.norm(out[0].numpy(), axis=0) / np.linalg.norm(kernel, axis=0)
    assert np.all(ratio <= 0.05 * (1 + 1e-5)) and np.any(ratio < 0.049)  # some units clipped, some not


def test_adaptive_clip_zero_gradient_and_fan_in_override():
    w = rand(3, 3, 4, 2)  # Conv2DTranspose layout (h, w, out, in): units on axis 2
    var = keras.Variable(w)
    g = rand(3, 3, 4, 2, scale=5.0)
    mapping = {var.path: (0, 1, 3)}
    (out,) = ops.adaptive_clip([tf.constant(g)], [var], clipping=0.02, fan_in_axes=mapping)
    np.testing.assert_allclose(out.numpy(), np_agc(g, w, 0.02, 1e-3, (0, 1, 3)), rtol=1e-5)
    (zero,) = ops.adaptive_clip([tf.zeros_like(g)], [var])  # 1e-6 floor: no 0/0
    np.testing.assert_array_equal(zero.numpy(), 0.0)
    # A weight without a per-unit fan-in (mapping entry None) is clipped as one unit.
    (whole,) = ops.adaptive_clip([tf.constant(g)], [var], clipping=0.02, fan_in_axes={var.path: None})
    np.testing.assert_allclose(whole.numpy(), np_agc(g, w, 0.02, 1e-3, (0, 1, 2, 3)), rtol=1e-5)
    # So is a rank-2 bias (Keras' GRU bias is (2, 3 * units)).
    bias = keras.Variable(rand(2, 6), name="bias")
    g_bias = rand(2, 6, scale=5.0)
    (clipped_bias,) = ops.adaptive_clip([tf.constant(g_bias)], [bias], clipping=0.02)
    expected_bias = np_agc(g_bias, bias.numpy(), 0.02, 1e-3, (0, 1))
    np.testing.assert_allclose(clipped_bias.numpy(), expected_bias, rtol=1e-5)


def test_adaptive_clip_sparse_is_one_unit_and_stays_sparse():
    table = rand(5, 2)
    var = keras.Variable(table)
    slices = sparse(rand(2, 2, scale=10.0), [1, 3], [5, 2])
    (out,) = ops.adaptive_clip([slices], [var], clipping=0.1)
    assert isinstance(out, tf.IndexedSlices)
    np.testing.assert_array_equal(out.indices.numpy(), [1, 3])
    # one unit: the values' norm against the whole table's norm
    expected = slices.values.numpy() * min(
        1.0, 0.1 * np.linalg.norm(table) / np.linalg.norm(slices.values.numpy()))
    np.testing.assert_allclose(out.values.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_adaptive_clip_low_precision(dtype):
    w = np.array([[3.0], [4.0]], np.float32)
    g = np.array([[300.0], [400.0]], np.float32)  # ||g||^2 overflows float16
    (out,) = ops.adaptive_clip([tf.constant(g, dtype)], [keras.Variable(w)], clipping=0.1)
    assert out.dtype == dtype
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), np_agc(g, w, 0.1, 1e-3, (0,)), rtol=1e-2)


@pytest.mark.parametrize("kwargs,name", [
    ({"clipping": 0.0}, "clipping"), ({"clipping": -1}, "clipping"), ({"clipping": "x"}, "clipping"),
    ({"eps": 0}, "eps"), ({"eps": True}, "eps"),
])
def test_adaptive_clip_bad_arguments(kwargs, name):
    var = keras.Variable(rand(2, 2))
    with pytest.raises(ValueError, match=name):
        ops.adaptive_clip([tf.constant(rand(2, 2))], [var], **kwargs)


def test_adaptive_clip_needs_aligned_lists():
    var = keras.Variable(rand(2, 2))
    with pytest.raises(ValueError, match="gradients.*variables"):
        ops.adaptive_clip([tf.constant(rand(2, 2))], [var, var])


# ---------------------------------------------------------------- XLA


def test_ops_inside_jit_compiled_function_dense_and_sparse():
    kernel = keras.Variable(rand(4, 3))
    table = keras.Variable(rand(6, 2))
    g_kernel = rand(4, 3, scale=4.0)
    ids = tf.constant([1, 4, 4])

    @tf.function(jit_compile=True)
    def run(g):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.gather(table.value, ids) ** 2)
        (g_table,) = tape.gradient(loss, [table.value])  # IndexedSlices
        grads = [g, None, g_table]
        variables = [kernel, kernel, table]
        clipped, norm = ops.clip_by_global_norm(grads, 1.0)
        per_tensor = ops.clip_by_norm(grads, 1.0)
        by_value = ops.clip_by_value(grads, 0.5)
        centered = ops.centralize_gradients(grads, variables)
        agc = ops.adaptive_clip(grads, variables, clipping=0.1)
        return {
            "sparse_stays_sparse": tf.constant(isinstance(g_table, tf.IndexedSlices)
                                               and isinstance(clipped[2], tf.IndexedSlices)
                                               and isinstance(centered[2], tf.IndexedSlices)),
            "table_grad": tf.convert_to_tensor(g_table), "norm": norm,
            "clipped": clipped[0], "clipped_table": tf.convert_to_tensor(clipped[2]),
            "per_tensor": per_tensor[0], "by_value": by_value[0],
            "centered": centered[0], "centered_table": tf.convert_to_tensor(centered[2]),
            "agc": agc[0], "finite": ops.all_finite(grads),
        }

    out = {k: v.numpy() for k, v in run(tf.constant(g_kernel)).items()}
    rows = table.numpy()
    g_table = np.zeros_like(rows)
    for i in [1, 4, 4]:
        g_table[i] += 2 * rows[i]
    np.testing.assert_allclose(out["table_grad"], g_table, rtol=1e-6)
    values_norm_sq = np.sum((2 * rows[[1, 4, 4]]) ** 2)  # TF counts IndexedSlices by values
    n = np.sqrt(np.sum(g_kernel.astype(np.float64) ** 2) + values_norm_sq)
    assert bool(out["sparse_stays_sparse"])
    np.testing.assert_allclose(out["norm"], n, rtol=1e-5)
    np.testing.assert_allclose(out["clipped"], g_kernel / n, rtol=1e-5)
    np.testing.assert_allclose(out["clipped_table"], g_table / n, rtol=1e-5)
    np.testing.assert_allclose(out["per_tensor"], np_clip_by_norm(g_kernel, 1.0), rtol=1e-5)
    np.testing.assert_allclose(out["by_value"], np.clip(g_kernel, -0.5, 0.5))
    np.testing.assert_allclose(out["centered"], np_centralize(g_kernel, (0,)), atol=1e-5)
    np.testing.assert_allclose(out["centered_table"], g_table, rtol=1e-6)
    np.testing.assert_allclose(out["agc"], np_agc(g_kernel, kernel.numpy(), 0.1, 1e-3, (0,)), rtol=1e-5)
    assert bool(out["finite"])


# ---------------------------------------------------------------- docstring examples


@pytest.mark.parametrize("module", [clipping, centralization, adaptive_clipping, finite])
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"tf": tf, "keras": keras, "np": np},
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize("threshold", [np.float32(0.5), np.float64(0.5)])
def test_numpy_scalar_thresholds_are_accepted(threshold):
    gradient = tf.constant([3.0, 4.0])
    clipped, norm = ops.clip_by_global_norm([gradient], threshold)
    np.testing.assert_allclose(clipped[0].numpy(), [0.3, 0.4], rtol=1e-6)
    np.testing.assert_allclose(ops.clip_by_norm([gradient], threshold)[0].numpy(), [0.3, 0.4], rtol=1e-6)
    np.testing.assert_allclose(ops.clip_by_value([gradient], threshold)[0].numpy(), [0.5, 0.5])
