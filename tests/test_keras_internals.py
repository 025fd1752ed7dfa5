"""The private Keras hooks: a Keras that stops calling them is an error, never a silent no-op."""

import pathlib
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend.tensorflow.optimizer import TFOptimizer

import keras_gradops as kgo
from keras_gradops import keras_internals


def _update_without_the_hook(self, grads, trainable_variables, learning_rate):
    for grad, var in zip(grads, trainable_variables):
        self.update_step(grad, var.value if isinstance(var, keras.Variable) else var, learning_rate)


@pytest.fixture
def move_hook(monkeypatch):
    """Replaces Keras' ``_backend_update_step`` by one that no longer calls ``_all_reduce_sum_gradients``.

    The once-a-process probe keeps its passing result: what must stop training
    is the check of every ``apply``.
    """
    yield lambda: monkeypatch.setattr(TFOptimizer, "_backend_update_step", _update_without_the_hook)
    monkeypatch.undo()
    keras_internals.check_aggregation_hook(force=True)  # the real Keras passes again


def test_the_probe_passes_on_this_keras():
    keras_internals.check_aggregation_hook(force=True)


def test_the_probe_finds_a_moved_hook(move_hook):
    move_hook()
    with pytest.raises(keras_internals.KerasHookError, match=r"_all_reduce_sum_gradients.*Keras 3\.10 to 3\.15"):
        keras_internals.check_aggregation_hook(force=True)


OPTIMIZERS = {
    "SGDGC": lambda: kgo.SGDGC(learning_rate=1.0, momentum=0.5, global_clipnorm=1.0),
    "AdamGC-update": lambda: kgo.AdamGC(learning_rate=0.1, clipnorm=1.0, centralization="update"),
    "AdagradGCC-skip": lambda: kgo.AdagradGCC(learning_rate=0.1, clipvalue=0.5, skip_nonfinite=True),
    "centralized-Lion": lambda: kgo.with_gradient_centralization(keras.optimizers.Lion(0.1, global_clipnorm=1.0)),
    "centralized-RMSprop": lambda: kgo.with_gradient_centralization(keras.optimizers.RMSprop(0.1)),
}


@pytest.mark.parametrize("in_function", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_a_hook_moved_after_training_stops_the_next_apply(move_hook, make, in_function):
    optimizer = make()
    variable = keras.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
    gradient = tf.constant([[3.0, 0.0, 1.0], [0.0, 4.0, 2.0]])
    apply = (lambda: optimizer.apply([gradient], [variable]))
    apply()  # trains with Keras as it is
    first = variable.numpy()
    assert optimizer.iterations.numpy() == 1 and not np.array_equal(first, np.arange(6).reshape(2, 3))
    move_hook()
    with pytest.raises(keras_internals.KerasHookError, match=r"updated a variable without calling `_all_reduce_sum_gradients`"):
        tf.function(apply)() if in_function else apply()
    np.testing.assert_array_equal(variable.numpy(), first)  # nothing was applied
    assert optimizer.iterations.numpy() == 1


@pytest.mark.parametrize("run_eagerly", [False, True])
@pytest.mark.parametrize("wrapper", ["GradientOpsModel", "GuessedGradientModel"])
def test_a_hook_moved_after_training_stops_a_wrapper_model(move_hook, wrapper, run_eagerly):
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    if wrapper == "GradientOpsModel":
        model = kgo.GradientOpsModel(net, global_clipnorm=1.0)
    else:
        model = kgo.GuessedGradientModel(net, method="directional_descent", seed=1)
    x, y = np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", run_eagerly=run_eagerly)
    model.fit(x, y, verbose=0)
    trained = [w.copy() for w in net.get_weights()]
    move_hook()
    if not run_eagerly:
        model.compile(optimizer=model.optimizer, loss="mse")  # a new train function, traced on the moved Keras
    with pytest.raises(keras_internals.KerasHookError, match="without calling `_all_reduce_sum_gradients`"):
        model.fit(x, y, verbose=0)
    for before, after in zip(trained, net.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_an_optimizer_serves_one_wrapper_model():
    optimizer = keras.optimizers.SGD(0.1)
    first = kgo.GradientOpsModel(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    second = kgo.GradientOpsModel(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    first.compile(optimizer=optimizer, loss="mse")
    first.fit(np.ones((4, 3)), np.zeros((4, 2)), verbose=0)
    second.compile(optimizer=optimizer, loss="mse")
    with pytest.raises(ValueError, match="needs an optimizer of its own"):
        second.fit(np.ones((4, 3)), np.zeros((4, 2)), verbose=0)


PRIVATE_USES = re.compile(
    r"keras\.src|tensorflow\.python|tf\.__internal__|\._(flatten_layers|keras_history|inbound_nodes|loss_tracker|"
    r"get_variable_index|use_weight_decay|initial_epoch|all_reduce_sum_gradients|clip_gradients|"
    r"maybe_symbolic_build|momentums|velocities|backend_update_step|distributed_tf_update_step|apply_weight_decay)\b"
)


def test_private_keras_and_tensorflow_names_appear_in_keras_internals_only():
    package = pathlib.Path(kgo.__file__).parent
    offenders = [f"{path.relative_to(package)}:{number}: {line.strip()}"
                 for path in sorted(package.rglob("*.py")) if path.name != "keras_internals.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if PRIVATE_USES.search(line)]
    assert not offenders, offenders
    assert PRIVATE_USES.search((package / "keras_internals.py").read_text())  # the pattern does find them


@pytest.mark.parametrize("jit_compile", [False, True])
def test_compiled_by_xla_tells_which_runtime_traces(jit_compile):
    seen = []

    @tf.function(jit_compile=jit_compile)
    def step(x):
        seen.append(keras_internals.compiled_by_xla())
        return x + 1

    step(tf.constant(1.0))
    assert seen == [jit_compile]
    assert keras_internals.compiled_by_xla() is False  # eager


@pytest.mark.parametrize("owner, attribute, read", [
    (keras.optimizers.Optimizer, "_get_variable_index",
     lambda: keras_internals.variable_index(keras.optimizers.SGD(), keras.Variable(1.0))),
    (keras.layers.Layer, "_flatten_layers", lambda: keras_internals.all_layers(keras.layers.Dense(1))),
    (tf.__internal__.distribute, "strategy_supports_no_merge_call",
     keras_internals.strategy_supports_no_merge_call),
], ids=["optimizer", "layer", "tensorflow"])
def test_a_private_name_that_moved_is_a_keras_hook_error_naming_it_and_the_versions(monkeypatch, owner, attribute, read):
    for cls in (owner.__mro__ if isinstance(owner, type) else (owner,)):
        if attribute in vars(cls):
            monkeypatch.delattr(cls, attribute)
    with pytest.raises(keras_internals.KerasHookError, match=(
        rf"{attribute}.*Keras {re.escape(keras.__version__)} / TensorFlow {re.escape(tf.__version__)}.*"
        r"tested with Keras 3\.10 to 3\.15 and TensorFlow 2\.18 to 2\.21"
    )):
        read()


def test_an_operation_is_not_taken_for_a_layer():
    getitem, _ = keras_internals.producing_layer(keras.Input((2, 3))[:, 0])
    assert type(getitem).__name__ == "GetItem" and not isinstance(getitem, keras.layers.Layer)
    with pytest.raises(TypeError, match="is a Keras operation, not a layer"):
        keras_internals.all_layers(getitem)


def test_a_replaced_call_runs_for_that_layer_only_and_goes_after_the_block():
    dense, other = keras.layers.Dense(2), keras.layers.Dense(2)
    x = np.ones((1, 3), "float32")
    dense(x), other(x)
    with keras_internals.calls_replaced({dense: lambda inputs, *args, **kwargs: inputs * 0 + 7}):
        np.testing.assert_array_equal(dense(x).numpy(), np.full((1, 3), 7.0))
        assert not np.allclose(other(x).numpy(), 7.0)
        with pytest.raises(keras_internals.KerasHookError, match="already has its `call` replaced"):
            with keras_internals.calls_replaced({dense: lambda inputs: inputs}):
                pass
    assert "call" not in vars(dense)
    np.testing.assert_allclose(dense(x).numpy(), x @ dense.kernel.numpy() + dense.bias.numpy(), rtol=1e-6)


def test_a_replaced_call_that_keras_never_runs_is_a_keras_hook_error():
    """What a Keras that stopped calling ``self.call`` would look like: the block runs, no replacement is reached."""
    dense = keras.layers.Dense(2)
    with pytest.raises(keras_internals.KerasHookError, match="did not run it"):
        with keras_internals.calls_replaced({dense: lambda inputs: inputs}):
            pass
    assert "call" not in vars(dense)
