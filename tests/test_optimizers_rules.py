"""The GC optimizer family against an independent NumPy implementation.

The reference below is written from the GC paper's reference optimizers
(Yong et al., ECCV 2020: ``SGD_GC``/``Adam_GC``/..., as README's table lists
them) and Keras' own update formulas, and shares
no code with the package. Each case runs several steps of
``optimizer.apply`` inside a ``tf.function`` on a Dense kernel, a Conv2D
kernel and a bias at once.
"""

import doctest
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_gradops as kgo
from keras_gradops.optimizers import centralized

SHAPES = [(4, 3), (2, 2, 3, 4), (3,)]  # Dense kernel, Conv2D kernel, bias
STEPS = 3

# class -> (family, L2 weight decay in the gradient?, conv kernels only?)
SPEC = {
    kgo.SGDGC: ("sgd", True, False), kgo.SGDGCC: ("sgd", True, True),
    kgo.SGDWGC: ("sgd", False, False), kgo.SGDWGCC: ("sgd", False, True),
    kgo.AdamGC: ("adam", True, False), kgo.AdamGCC: ("adam", True, True),
    kgo.AdamWGC: ("adam", False, False), kgo.AdamWGCC: ("adam", False, True),
    kgo.AdagradGC: ("adagrad", True, False), kgo.AdagradGCC: ("adagrad", True, True),
}
BASE = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam, "adagrad": keras.optimizers.Adagrad}


# ---------------------------------------------------------------- the NumPy reference


def np_gc(x, conv_only):
    """Centralize over all axes but the last, for rank > 1 (rank >= 4 with conv_only)."""
    if x.ndim <= 1 or (conv_only and x.ndim < 4):
        return x
    return x - x.mean(axis=tuple(range(x.ndim - 1)), keepdims=True)


def np_clip(grads, hp):
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    if hp.get("global_clipnorm"):
        c = hp["global_clipnorm"]
        grads = [g * c / max(norm, c) for g in grads]
    elif hp.get("clipnorm"):
        c = hp["clipnorm"]
        grads = [g * c / max(np.linalg.norm(g), c) for g in grads]
    elif hp.get("clipvalue"):
        grads = [np.clip(g, -hp["clipvalue"], hp["clipvalue"]) for g in grads]
    return grads, norm


def reference(cls, hp, weights, grad_steps, lr_at):
    """Runs the update rule of ``cls`` in float64; returns (weights, last pre-clip norm)."""
    family, l2, conv_only = SPEC[cls]
    keras_default_wd = 0.004 if cls in (kgo.AdamWGC, kgo.AdamWGCC) else None  # AdamW's default
    wd = hp.get("weight_decay", keras_default_wd) or 0.0
    mode = hp.get("centralization", "gradient")
    w = [x.astype(np.float64) for x in weights]
    zeros = [np.zeros_like(x) for x in w]
    m, v, v_hat = list(zeros), list(zeros), list(zeros)
    acc = [np.full_like(x, hp.get("initial_accumulator_value", 0.1)) for x in w]
    norm = None
    for t, raw in enumerate(grad_steps, start=1):
        grads, norm = np_clip([g.astype(np.float64) for g in raw], hp)
        lr = lr_at(t - 1)
        for i, g in enumerate(grads):
            if l2:
                g = g + wd * w[i]
            if mode == "gradient":
                g = np_gc(g, conv_only)
            if family == "sgd":
                if not l2:
                    w[i] = w[i] - lr * wd * w[i]
                mu = hp.get("momentum", 0.0)
                if mu:
                    m[i] = mu * m[i] - lr * g
                    w[i] = w[i] + (mu * m[i] - lr * g if hp.get("nesterov") else m[i])
                else:
                    w[i] = w[i] - lr * g
            elif family == "adam":
                b1, b2, eps = hp["beta_1"], hp["beta_2"], hp["epsilon"]
                m[i] = m[i] + (g - m[i]) * (1 - b1)
                v[i] = v[i] + (g * g - v[i]) * (1 - b2)
                denominator = v[i]
                if hp.get("amsgrad"):
                    v_hat[i] = np.maximum(v_hat[i], v[i])
                    denominator = v_hat[i]
                alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                delta = alpha * m[i] / (np.sqrt(denominator) + eps)
                if not l2:
                    delta = delta + lr * wd * w[i]
                if mode == "update":
                    delta = np_gc(delta, conv_only)
                w[i] = w[i] - delta
            else:
                acc[i] = acc[i] + g * g
                w[i] = w[i] - lr * g / np.sqrt(acc[i] + hp["epsilon"])
    return w, norm


# ---------------------------------------------------------------- cases


def constant_lr(value):
    return (value, lambda step: value)


def halving_lr(value):
    """ExponentialDecay halving every step; the reference evaluates it at ``iterations``."""
    schedule = keras.optimizers.schedules.ExponentialDecay(value, decay_steps=1, decay_rate=0.5)
    return (schedule, lambda step: value * 0.5**step)


ADAM = {"beta_1": 0.9, "beta_2": 0.99, "epsilon": 1e-7}
SGD_CASES = {
    "plain": {"lr": constant_lr(0.1)},
    "momentum_wd": {"lr": constant_lr(0.1), "momentum": 0.9, "weight_decay": 0.05},
    "nesterov_wd_clipnorm": {"lr": constant_lr(0.1), "momentum": 0.5, "nesterov": True,
                             "weight_decay": 0.05, "clipnorm": 1.0},
    "schedule_global_clipnorm_wd": {"lr": halving_lr(0.2), "momentum": 0.9, "weight_decay": 0.05,
                                    "global_clipnorm": 1.0},
    "clipvalue_loss_scale": {"lr": constant_lr(0.1), "clipvalue": 0.5, "weight_decay": 0.05,
                             "loss_scale_factor": 8.0},
}
ADAM_CASES = {
    "plain": {"lr": constant_lr(0.01), **ADAM},
    "wd_amsgrad_global_clipnorm": {"lr": constant_lr(0.01), **ADAM, "weight_decay": 0.05,
                                   "amsgrad": True, "global_clipnorm": 1.0},
    "update_wd": {"lr": constant_lr(0.01), **ADAM, "weight_decay": 0.05, "centralization": "update"},
    "update_amsgrad_clipvalue_schedule": {"lr": halving_lr(0.02), **ADAM, "weight_decay": 0.05,
                                          "amsgrad": True, "clipvalue": 0.5, "centralization": "update"},
}
ADAGRAD_CASES = {
    "plain": {"lr": constant_lr(0.1), "epsilon": 1e-7},
    "wd_clipnorm": {"lr": constant_lr(0.1), "epsilon": 1e-3, "initial_accumulator_value": 0.2,
                    "weight_decay": 0.05, "clipnorm": 1.0},
    "schedule_global_clipnorm": {"lr": halving_lr(0.2), "epsilon": 1e-7, "global_clipnorm": 1.0},
}
CASES = [
    pytest.param(cls, case, id=f"{cls.__name__}-{name}")
    for family_cases, classes in (
        (SGD_CASES, [kgo.SGDGC, kgo.SGDGCC, kgo.SGDWGC, kgo.SGDWGCC]),
        (ADAM_CASES, [kgo.AdamGC, kgo.AdamGCC, kgo.AdamWGC, kgo.AdamWGCC]),
        (ADAGRAD_CASES, [kgo.AdagradGC, kgo.AdagradGCC]),
    )
    for cls in classes
    for name, case in family_cases.items()
]


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    # A per-unit offset makes the gradient's mean far from zero, so GC matters.
    grads = [[(rng.normal(size=s) + rng.normal(size=s[-1:]) * 2).astype(np.float32) for s in SHAPES]
             for _ in range(STEPS)]
    return weights, grads


def run_optimizer(optimizer, weights, grad_steps, jit_compile=False, scale=1.0):
    variables = [keras.Variable(w) for w in weights]
    optimizer.build(variables)
    step = tf.function(lambda grads: optimizer.apply(grads, variables), jit_compile=jit_compile)
    for grads in grad_steps:
        step([tf.constant(g * scale) for g in grads])
    return [v.numpy() for v in variables]


def split_case(case):
    hp = {k: v for k, v in case.items() if k != "lr"}
    learning_rate, lr_at = case["lr"]
    return hp, learning_rate, lr_at


@pytest.mark.parametrize("cls,case", CASES)
def test_matches_numpy_reference(cls, case):
    hp, learning_rate, lr_at = split_case(case)
    weights, grads = make_data()
    optimizer = cls(learning_rate=learning_rate, **hp)
    got = run_optimizer(optimizer, weights, grads, scale=hp.get("loss_scale_factor", 1.0))
    expected, norm = reference(cls, hp, weights, grads, lr_at)
    for g, e, w0 in zip(got, expected, weights):
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-6)
        assert not np.allclose(g, w0)
    assert int(optimizer.iterations) == STEPS
    np.testing.assert_allclose(float(optimizer.grad_norm), norm, rtol=1e-5)
    assert int(optimizer.skipped_steps) == 0


@pytest.mark.parametrize("cls,case", [
    (kgo.SGDGC, SGD_CASES["schedule_global_clipnorm_wd"]),
    (kgo.AdamWGC, ADAM_CASES["update_amsgrad_clipvalue_schedule"]),
    (kgo.AdagradGCC, ADAGRAD_CASES["wd_clipnorm"]),
], ids=["SGDGC", "AdamWGC-update", "AdagradGCC"])
def test_matches_numpy_reference_under_xla(cls, case):
    hp, learning_rate, lr_at = split_case(case)
    weights, grads = make_data(seed=3)
    got = run_optimizer(cls(learning_rate=learning_rate, **hp), weights, grads, jit_compile=True)
    expected, _ = reference(cls, hp, weights, grads, lr_at)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-6)


def test_reference_differs_between_variants():
    """Guards the reference itself: L2 vs decoupled decay, GC vs GCC, gradient vs update differ."""
    weights, grads = make_data()
    hp = {"weight_decay": 0.05, **ADAM}
    lr = lambda step: 0.01  # noqa: E731
    runs = {
        name: reference(cls, dict(hp, **extra), weights, grads, lr)[0]
        for name, cls, extra in [
            ("l2", kgo.AdamGC, {}), ("decoupled", kgo.AdamWGC, {}),
            ("gcc", kgo.AdamGCC, {}), ("update", kgo.AdamGC, {"centralization": "update"}),
        ]
    }
    for a, b in [("l2", "decoupled"), ("l2", "gcc"), ("l2", "update")]:
        assert not np.allclose(runs[a][0], runs[b][0]), (a, b)


# ---------------------------------------------------------------- rank-1 (and GCC dense) = Keras base


def _base_comparable_args(cls):
    family, l2, _ = SPEC[cls]
    args = {"sgd": {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True},
            "adam": {"learning_rate": 0.01, "amsgrad": True},
            "adagrad": {"learning_rate": 0.1}}[family]
    if not l2:
        args["weight_decay"] = 0.05  # decoupled: exactly Keras' weight_decay
    return dict(args, clipnorm=1.0)


@pytest.mark.parametrize("cls", list(SPEC), ids=lambda c: c.__name__)
def test_uncentralized_variables_update_exactly_like_keras_base(cls):
    family, _, conv_only = SPEC[cls]
    args = _base_comparable_args(cls)
    rng = np.random.default_rng(5)
    weights = [rng.normal(size=(3,)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)]
    grads = [[rng.normal(size=w.shape).astype(np.float32) * 3 + 1 for w in weights] for _ in range(STEPS)]
    ours = run_optimizer(cls(**args), weights, grads)
    keras_base = run_optimizer(BASE[family](**args), weights, grads)
    np.testing.assert_allclose(ours[0], keras_base[0], rtol=1e-6, atol=1e-7)  # bias
    if conv_only:  # GCC: a Dense kernel is not centralized either
        np.testing.assert_allclose(ours[1], keras_base[1], rtol=1e-6, atol=1e-7)
    else:
        assert not np.allclose(ours[1], keras_base[1], atol=1e-4)


@pytest.mark.parametrize("cls", list(SPEC), ids=lambda c: c.__name__)
def test_defaults_are_keras_defaults(cls):
    family, _, _ = SPEC[cls]
    base = keras.optimizers.AdamW if cls in (kgo.AdamWGC, kgo.AdamWGCC) else BASE[family]
    ours, theirs = cls().get_config(), base().get_config()
    for key, value in theirs.items():
        if key != "name":
            assert ours[key] == value, key
    assert ours["fan_in_axes"] is None and ours["skip_nonfinite"] is False


# ---------------------------------------------------------------- one-line GC on any optimizer


@pytest.mark.parametrize("make,conv_only", [
    (lambda: keras.optimizers.Lion(learning_rate=0.01, weight_decay=0.05), False),
    (lambda: keras.optimizers.RMSprop(learning_rate=0.01, momentum=0.5, global_clipnorm=1.0), False),
    (lambda: keras.optimizers.SGD(learning_rate=0.1, momentum=0.9, clipvalue=0.5), True),
], ids=["Lion", "RMSprop", "SGD-conv_only"])
def test_with_gradient_centralization_equals_base_on_clipped_centralized_gradient(make, conv_only):
    weights, grads = make_data(seed=7)
    optimizer = kgo.with_gradient_centralization(make(), conv_only=conv_only)
    assert isinstance(optimizer, type(make())) and optimizer.conv_only is conv_only
    got = run_optimizer(optimizer, weights, grads)
    # Reference: NumPy clipping then NumPy GC, fed to the plain Keras optimizer without clipping.
    base = make()
    hp = {k: getattr(base, k) for k in ("clipnorm", "clipvalue", "global_clipnorm")}
    config = dict(base.get_config(), clipnorm=None, clipvalue=None, global_clipnorm=None)
    preprocessed = [[np_gc(g, conv_only).astype(np.float32) for g in np_clip(step, hp)[0]] for step in grads]
    expected = run_optimizer(type(base).from_config(config), weights, preprocessed)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def _keras_muon_runs_on_tensorflow():
    try:
        keras.optimizers.Muon(0.1).apply([tf.ones((2, 2))], [keras.Variable(np.ones((2, 2), np.float32))])
    except AttributeError:  # Keras 3.10's Muon reads `.path` of the tf.Variable its TF backend passes
        return False
    return True


needs_keras_muon = pytest.mark.skipif(
    not _keras_muon_runs_on_tensorflow(), reason=f"Keras {keras.__version__}'s own Muon fails on TensorFlow"
)


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=needs_keras_muon) if name == "Muon" else name for name in centralized.BUILTIN_OPTIMIZERS
])
def test_with_gradient_centralization_keeps_every_builtin_update_on_rank1_weights(name):
    """Rank-1 weights are not centralized: the update must be exactly the base optimizer's
    (catches bases with their own step logic, e.g. Nadam's ``_backend_update_step``)."""
    rng = np.random.default_rng(9)
    weights = [rng.normal(size=(5,)).astype(np.float32)]
    grads = [[rng.normal(size=(5,)).astype(np.float32)] for _ in range(STEPS)]
    make = getattr(keras.optimizers, name)
    got = run_optimizer(kgo.with_gradient_centralization(make(learning_rate=0.1)), weights, grads)
    expected = run_optimizer(make(learning_rate=0.1), weights, grads)
    assert np.all(np.isfinite(got[0]))
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6, atol=1e-7)


@needs_keras_muon
def test_muon_keeps_its_own_weight_decay_and_updates_with_the_centralized_gradient():
    """Muon's orthogonalized update and its own decay rule, applied to GC(g): as plain Muon on GC(g)."""
    rng = np.random.default_rng(5)
    weights = [rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)]
    grads = [(rng.normal(size=(6, 4)) + 1).astype(np.float32), rng.normal(size=4).astype(np.float32)]

    def run(optimizer, gradients):
        variables = [keras.Variable(w) for w in weights]
        optimizer.apply([tf.constant(g) for g in gradients], variables)
        return [v.numpy() for v in variables]

    got = run(kgo.with_gradient_centralization(keras.optimizers.Muon(learning_rate=0.1, weight_decay=0.1)), grads)
    expected = run(keras.optimizers.Muon(learning_rate=0.1, weight_decay=0.1), [np_gc(grads[0], False), grads[1]])
    for g, e, w in zip(got, expected, weights):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)
        assert not np.allclose(g, w)


def test_with_gradient_centralization_bad_input():
    with pytest.raises(TypeError, match="optimizer"):
        kgo.with_gradient_centralization("sgd")
    with pytest.raises(ValueError, match="conv_only"):
        kgo.with_gradient_centralization(keras.optimizers.SGD(), conv_only="yes")
    built = keras.optimizers.SGD()
    built.build([keras.Variable(np.zeros((2, 2), np.float32))])
    with pytest.raises(ValueError, match="built"):
        kgo.with_gradient_centralization(built)
    with pytest.raises(TypeError, match="LossScaleOptimizer|inner"):
        kgo.with_gradient_centralization(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()))
    with pytest.raises(TypeError, match="already"):
        kgo.with_gradient_centralization(kgo.SGDGC())
    with pytest.raises(TypeError, match="optimizer_class"):
        kgo.centralized_class(keras.layers.Dense)


# ---------------------------------------------------------------- exclusions, fan-in override, non-finite


def test_exclude_from_centralization_by_name_and_by_variable():
    rng = np.random.default_rng(2)
    values = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(3)]
    names = ["dense_kernel", "attention_kernel", "other_kernel"]
    grads = [(rng.normal(size=(4, 3)) + 2).astype(np.float32) for _ in range(3)]
    variables = [keras.Variable(v, name=n) for v, n in zip(values, names)]
    optimizer = kgo.SGDGC(learning_rate=1.0)
    optimizer.exclude_from_centralization(var_list=[variables[2]], var_names=["attention"])
    optimizer.apply([tf.constant(g) for g in grads], variables)
    np.testing.assert_allclose(values[0] - variables[0].numpy(), np_gc(grads[0], False), atol=1e-6)
    np.testing.assert_allclose(values[1] - variables[1].numpy(), grads[1], atol=1e-6)
    np.testing.assert_allclose(values[2] - variables[2].numpy(), grads[2], atol=1e-6)
    with pytest.raises(ValueError, match="built"):
        optimizer.exclude_from_centralization(var_names=["dense"])


@pytest.mark.parametrize("cls", [kgo.SGDGC, kgo.SGDWGC], ids=["L2", "decoupled"])
def test_exclude_from_weight_decay_works_for_l2_and_decoupled_decay(cls):
    rng = np.random.default_rng(3)
    kernel, bias = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    gk, gb = (rng.normal(size=(4, 3)) + 1).astype(np.float32), rng.normal(size=3).astype(np.float32)
    variables = [keras.Variable(kernel, name="kernel"), keras.Variable(bias, name="bias")]
    optimizer = cls(learning_rate=0.1, weight_decay=0.5, name="custom_name")
    assert optimizer.name == "custom_name"
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    optimizer.apply([tf.constant(gk), tf.constant(gb)], variables)
    if cls is kgo.SGDGC:
        expected_kernel = kernel - 0.1 * np_gc(gk + 0.5 * kernel, False)
    else:
        expected_kernel = kernel - 0.1 * 0.5 * kernel - 0.1 * np_gc(gk, False)
    np.testing.assert_allclose(variables[0].numpy(), expected_kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variables[1].numpy(), bias - 0.1 * gb, rtol=1e-5, atol=1e-6)


def test_fan_in_axes_override_and_exclusion():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(3, 3, 4, 2)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
    ga = (rng.normal(size=a.shape) + 1).astype(np.float32)
    gb = (rng.normal(size=b.shape) + 1).astype(np.float32)
    va, vb = keras.Variable(a, name="transposed"), keras.Variable(b, name="excluded")
    optimizer = kgo.SGDGC(learning_rate=1.0, fan_in_axes={va.path: (0, 1, 3), vb.path: None})
    optimizer.apply([tf.constant(ga), tf.constant(gb)], [va, vb])
    np.testing.assert_allclose(a - va.numpy(), ga - ga.mean(axis=(0, 1, 3), keepdims=True), atol=1e-6)
    np.testing.assert_allclose(b - vb.numpy(), gb, atol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_skip_nonfinite_leaves_weights_and_slots_untouched(jit_compile):
    weights, grads = make_data(seed=8)
    optimizer = kgo.AdamWGC(learning_rate=0.01, weight_decay=0.05, skip_nonfinite=True, **ADAM)
    variables = [keras.Variable(w) for w in weights]
    optimizer.build(variables)
    step = tf.function(lambda g: optimizer.apply(g, variables), jit_compile=jit_compile)
    # A skipped step changes no variable but the count (iterations and grad_norm included,
    # as Keras' LossScaleOptimizer skips a step).
    bookkeeping = {optimizer.skipped_steps.path}

    def state():
        slots = {v.path: v.numpy() for v in optimizer.variables if v.path not in bookkeeping}
        return [v.numpy() for v in variables], slots

    step([tf.constant(g) for g in grads[0]])
    weights_before, slots_before = state()
    bad = [g.copy() for g in grads[1]]
    bad[1][0, 0, 0, 0] = np.nan
    bad[2][0] = np.inf
    step([tf.constant(g) for g in bad])
    weights_after, slots_after = state()
    for before, after in zip(weights_before, weights_after):
        np.testing.assert_array_equal(after, before)
    assert slots_after.keys() == slots_before.keys() and len(slots_after) >= 6
    for path in slots_before:
        np.testing.assert_array_equal(slots_after[path], slots_before[path], err_msg=path)
    assert int(optimizer.skipped_steps) == 1 and int(optimizer.iterations) == 1
    step([tf.constant(g) for g in grads[2]])
    assert int(optimizer.skipped_steps) == 1
    assert all(np.all(np.isfinite(v.numpy())) for v in variables)
    assert not np.allclose(variables[0].numpy(), weights_after[0])


def test_without_skip_nonfinite_a_nan_reaches_the_weights():
    weights, grads = make_data(seed=8)
    bad = [g.copy() for g in grads[0]]
    bad[0][0, 0] = np.nan
    got = run_optimizer(kgo.SGDGC(learning_rate=0.1), weights, [bad])
    assert np.isnan(got[0][:, 0]).all()  # the unit's mean is NaN: GC spreads it over the unit
    assert np.all(np.isfinite(got[0][:, 1:])) and np.all(np.isfinite(got[2]))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("cls,kwargs,name", [
    (kgo.SGDGC, {"learning_rate": 0.0}, "learning_rate"),
    (kgo.SGDGC, {"learning_rate": -0.1}, "learning_rate"),
    (kgo.AdamWGC, {"learning_rate": "fast"}, "learning_rate"),
    (kgo.SGDGC, {"momentum": -0.1}, "momentum"),
    (kgo.SGDWGC, {"momentum": 1.5}, "momentum"),
    (kgo.SGDGC, {"clipnorm": 0.0}, "clipnorm"),
    (kgo.AdamGC, {"clipvalue": -1.0}, "clipvalue"),
    (kgo.AdagradGC, {"global_clipnorm": 0.0}, "global_clipnorm"),
    (kgo.SGDGC, {"clipnorm": 1.0, "global_clipnorm": 1.0}, "clipnorm.*global_clipnorm"),
    (kgo.AdamGC, {"clipvalue": 1.0, "clipnorm": 1.0}, "clipnorm.*clipvalue"),
    (kgo.AdamGC, {"centralization": "gradients"}, "centralization"),
    (kgo.AdamWGCC, {"centralization": None}, "centralization"),
    (kgo.AdamGC, {"beta_1": 1.0}, "beta_1"),
    (kgo.AdamGC, {"beta_2": -0.5}, "beta_2"),
    (kgo.AdamGC, {"epsilon": -1e-7}, "epsilon"),
    (kgo.AdagradGCC, {"initial_accumulator_value": -0.1}, "initial_accumulator_value"),
    (kgo.SGDGC, {"weight_decay": -0.01}, "weight_decay"),
    (kgo.SGDGC, {"ema_momentum": 1.5}, "ema_momentum"),
    (kgo.SGDGC, {"skip_nonfinite": "yes"}, "skip_nonfinite"),
    (kgo.SGDGC, {"fan_in_axes": [0]}, "fan_in_axes"),
    (kgo.SGDGC, {"fan_in_axes": {"dense/kernel": (-1,)}}, "fan_in_axes"),
    (kgo.SGDGC, {"centralization": "update"}, "centralization"),
    (kgo.SGDGC, {"learning_rate": float("inf")}, "learning_rate"),
    (kgo.SGDGC, {"learning_rate": float("nan")}, "learning_rate"),
    (kgo.SGDGC, {"global_clipnorm": float("inf")}, "global_clipnorm"),
    (kgo.SGDGC, {"adaptive_clipping": 0.0}, "adaptive_clipping"),
    (kgo.SGDGC, {"adaptive_clipping": 0.01, "clipvalue": 1.0}, "adaptive_clipping"),
    (kgo.SGDGC, {"skip_nonfinite": True, "use_ema": True}, "use_ema"),
])
def test_bad_input_raises_value_error_naming_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_mapped_axes_beyond_the_rank_raise_when_the_optimizer_is_built():
    kernel = keras.Variable(np.ones((3, 2), np.float32), name="kernel")
    optimizer = kgo.SGDGC(learning_rate=0.1, fan_in_axes={kernel.path: (5,)})
    with pytest.raises(ValueError, match="fan_in_axes.*beyond its rank 2"):
        optimizer.build([kernel])


# ---------------------------------------------------------------- docstring examples


def test_docstring_examples():
    result = doctest.testmod(centralized, extraglobs={"tf": tf, "keras": keras})
    assert result.attempted > 0
    assert result.failed == 0
