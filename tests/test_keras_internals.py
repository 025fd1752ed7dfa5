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


@pytest.fixture
def moved_hook(monkeypatch):
    """A Keras whose ``_backend_update_step`` no longer calls ``_all_reduce_sum_gradients``."""

    def update_without_the_hook(self, grads, trainable_variables, learning_rate):
        for grad, var in zip(grads, trainable_variables):
            self.update_step(grad, var.value if isinstance(var, keras.Variable) else var, learning_rate)

    monkeypatch.setattr(TFOptimizer, "_backend_update_step", update_without_the_hook)
    keras_internals._hook_checked.clear()  # the next check probes this Keras
    yield
    monkeypatch.undo()
    keras_internals.check_aggregation_hook(force=True)  # the real Keras passes again


def test_the_probe_passes_on_this_keras():
    keras_internals.check_aggregation_hook(force=True)


def test_a_moved_hook_stops_an_optimizer_at_build(moved_hook):
    with pytest.raises(keras_internals.KerasHookError, match=r"_all_reduce_sum_gradients.*tested with Keras 3\.15"):
        keras_internals.check_aggregation_hook(force=True)
    optimizer = kgo.SGDGC(learning_rate=1.0, global_clipnorm=1.0)
    variable = keras.Variable(np.ones((2, 2), np.float32))
    with pytest.raises(keras_internals.KerasHookError):
        optimizer.apply([tf.ones((2, 2))], [variable])
    np.testing.assert_array_equal(variable.numpy(), np.ones((2, 2)))  # nothing was applied


def test_a_moved_hook_stops_a_wrapper_model_before_training(moved_hook):
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model = kgo.GradientOpsModel(net, global_clipnorm=1.0)
    model.compile(optimizer="sgd", loss="mse")
    before = [w.copy() for w in net.get_weights()]
    with pytest.raises(keras_internals.KerasHookError, match="Keras"):
        model.fit(np.ones((4, 3)), np.zeros((4, 2)), verbose=0)
    for b, w in zip(before, net.get_weights()):
        np.testing.assert_array_equal(b, w)


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
