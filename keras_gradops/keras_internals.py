"""Every private Keras and TensorFlow API this package uses, in one module.

Keras 3 has no public point between the cross-replica all-reduce of the
gradient and the per-variable updates of ``optimizer.apply``: Keras' TF
optimizer sums the replicas' gradients in ``_all_reduce_sum_gradients``
(called by ``_backend_update_step``) and its ``apply`` cannot run in
cross-replica context (``maybe_merge_call`` then fails on CPU and multi-worker
strategies). Clipping or checking the *aggregated* gradient with exactly one
all-reduce therefore needs that private method. It is used in one way only:
:func:`aggregation_hook` runs a function on its result.

Two checks stop training, with a :class:`KerasHookError` naming the Keras
version and the tested range, instead of silently updating without the
gradient ops:

- every ``apply``: a variable update (``update_step``) that Keras reaches
  without having called the hook in the same ``apply`` raises
  (:func:`expect_aggregation_hook`, :func:`require_aggregation_hook`). The
  check is Python run when the step is traced, so it costs nothing in a
  ``tf.function``, and it holds whatever replaced Keras' update code, at
  any time in the process;
- once a process, when an optimizer of this package is built or a wrapper
  model makes its train function: a probe optimizer checks that Keras
  updates with what the hook *returns* (:func:`check_aggregation_hook`).

The other private uses, each a read of state Keras' own subclasses read:

- ``Optimizer._get_variable_index`` and ``Optimizer._use_weight_decay``
  (called by Keras' own ``update_step``/weight decay code);
- ``Optimizer._clip_gradients``, overridden to a no-op by
  :class:`AggregatedGradientOptimizerMixin` (Keras would clip each replica's
  gradient before the all-reduce);
- ``Trainer._loss_tracker``, the metric Keras' own ``train_step`` updates;
- ``Trainer._initial_epoch``, which ``fit`` reads after ``on_train_begin``
  to resume (the way Keras' own ``BackupAndRestore`` resumes);
- ``Trainer._maybe_symbolic_build``: under ``MultiWorkerMirroredStrategy`` it
  reduces a per-replica data batch eagerly and fails (keras-team/keras#20585);
  :func:`first_local_batch` gives it this worker's first replica's batch;
- ``Layer._flatten_layers`` (every sub-layer, recursively), and
  ``KerasTensor._keras_history`` / ``Operation._inbound_nodes`` (the layer
  graph of a functional model);
- ``keras.src.export.export_utils.get_input_signature``;
- ``tf.__internal__.distribute.strategy_supports_no_merge_call``;
- ``tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext``:
  whether the function being traced will be compiled by XLA (the guessed
  step orders its work by data dependencies there, control dependencies
  elsewhere).
"""

import contextlib
import functools
import threading
import weakref

import keras
import tensorflow as tf

TESTED_KERAS = ("3.10", "3.15")
"""The oldest and newest Keras release lines CI tests (``.ci/run``); ``pyproject.toml`` allows any newer."""
TESTED_TENSORFLOW = ("2.18", "2.21")
"""The same for TensorFlow."""


class KerasHookError(RuntimeError):
    """Keras no longer calls a private hook this package depends on."""

    # AutoGraph re-raises an error from a traced function as its own type only when the type's
    # constructor is ``Exception``'s (otherwise as a ``StagingError``): keep this type visible in `fit`.
    __init__ = Exception.__init__


def _tested_range():
    (keras_oldest, keras_newest), (tf_oldest, tf_newest) = TESTED_KERAS, TESTED_TENSORFLOW
    return (
        f"It is tested with Keras {keras_oldest} to {keras_newest} and TensorFlow {tf_oldest} to {tf_newest} "
        f"(`pip install 'keras=={keras_newest}.*' 'tensorflow=={tf_newest}.*'`); please report the versions "
        "that failed."
    )


def _hook_error(problem):
    return KerasHookError(
        f"keras_gradops cannot reach the aggregated gradient in Keras {keras.__version__}: {problem}. "
        f"Its clipping and gradient checks would silently not run, so it stops here. {_tested_range()}"
    )


def _private(what):
    """Turns a missing private attribute or module into a :class:`KerasHookError` that names it."""

    def decorate(function):
        @functools.wraps(function)
        def reading_private_api(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except (AttributeError, ImportError) as error:
                raise KerasHookError(
                    f"keras_gradops reads {what}, which Keras {keras.__version__} / TensorFlow {tf.__version__} "
                    f"no longer provides ({type(error).__name__}: {error}). {_tested_range()}"
                ) from error

        return reading_private_api

    return decorate


# -- the aggregated gradient ---------------------------------------------------------------


def aggregation_hook(method, transform):
    """``_all_reduce_sum_gradients`` that runs ``transform`` on Keras' result.

    Args:
        method: the optimizer's bound ``_all_reduce_sum_gradients`` to wrap.
        transform: ``(gradients, variables) -> gradients`` on the gradient
            summed over replicas (``None``-free lists, the variables as Keras
            passes them: ``tf.Variable``s).

    Returns:
        A function with the signature of ``_all_reduce_sum_gradients``; it
        marks the optimizer's current ``apply`` as having reached the hook.
    """
    optimizer = method.__self__

    def all_reduce_sum_then_transform(grads_and_vars):
        reduced = list(method(grads_and_vars))
        gradients = transform([g for g, _ in reduced], [v for _, v in reduced])
        optimizer._keras_gradops_hook_reached = True
        return list(zip(gradients, [v for _, v in reduced]))

    return all_reduce_sum_then_transform


def expect_aggregation_hook(optimizer):
    """Starts an ``apply`` of ``optimizer``: its variable updates now need the hook first.

    Replicas of a ``MirroredStrategy`` run their ``apply`` in threads that
    Keras' strategy runs one at a time, each up to its all-reduce or its end;
    so one flag an optimizer is set by every replica's hook before any update.
    """
    optimizer._keras_gradops_hook_reached = False


def require_aggregation_hook(optimizer):
    """Raises :class:`KerasHookError` if Keras updates a variable before the hook ran in this ``apply``."""
    if getattr(optimizer, "_keras_gradops_hook_reached", None) is False:
        raise _hook_error(
            f"`{type(optimizer).__name__}.apply` updated a variable without calling `_all_reduce_sum_gradients` "
            "first (has `_backend_update_step` been replaced?)"
        )


def install_aggregation_hook(optimizer, transform, owner):
    """Makes ``optimizer.apply`` run ``transform`` on the gradient summed over replicas.

    For a wrapper model's optimizer, which may be any Keras optimizer. The
    hook is set on that optimizer instance (its class's own method, which
    may be a hook of this package's optimizers, runs first); nothing global
    changes. The same ``owner`` installing it again replaces the transform.

    Raises:
        ValueError: another model's hook is on ``optimizer`` (an optimizer
            instance serves one model).
        KerasHookError: see :func:`check_aggregation_hook`.
    """
    check_aggregation_hook()
    current = getattr(optimizer, "_keras_gradops_owner", None)
    if current is not None and current() is not None and current() is not owner:
        raise ValueError(
            f"The optimizer {optimizer.name!r} already trains model {current().name!r}; "
            f"{owner.name!r} needs an optimizer of its own."
        )
    optimizer._keras_gradops_owner = weakref.ref(owner)
    cls = type(optimizer)
    optimizer._all_reduce_sum_gradients = aggregation_hook(
        cls._all_reduce_sum_gradients.__get__(optimizer), transform
    )
    optimizer.apply = _expecting_hook(cls.apply.__get__(optimizer))
    optimizer.update_step = _requiring_hook(cls.update_step.__get__(optimizer))


def _expecting_hook(apply):
    optimizer = apply.__self__

    def apply_expecting_hook(grads, trainable_variables=None):
        expect_aggregation_hook(optimizer)
        return apply(grads, trainable_variables)

    return apply_expecting_hook


def _requiring_hook(update_step):
    optimizer = update_step.__self__

    def update_step_requiring_hook(gradient, variable, learning_rate):
        require_aggregation_hook(optimizer)
        return update_step(gradient, variable, learning_rate)

    return update_step_requiring_hook


class AggregatedGradientOptimizerMixin:
    """Routes Keras' aggregated gradient to ``self.transform_aggregated_gradients``.

    Mixed into the optimizer classes of this package. Keras' own clipping is
    turned off: it would clip each replica's gradient before the all-reduce;
    the subclass clips the aggregated one. Every ``apply`` must reach the
    hook before ``update_step`` (:func:`require_aggregation_hook`).
    """

    def transform_aggregated_gradients(self, gradients, variables):
        raise NotImplementedError

    def apply(self, grads, trainable_variables=None):
        expect_aggregation_hook(self)
        return super().apply(grads, trainable_variables)

    def update_step(self, gradient, variable, learning_rate):
        require_aggregation_hook(self)
        return super().update_step(gradient, variable, learning_rate)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        method = super()._all_reduce_sum_gradients
        return aggregation_hook(method, self.transform_aggregated_gradients)(grads_and_vars)

    def _clip_gradients(self, grads):
        return grads


_hook_checked = []


def check_aggregation_hook(force=False):
    """Raises :class:`KerasHookError` unless Keras' ``apply`` still goes through the hook.

    A probe SGD optimizer, with the hook doubling the gradient, updates one
    variable eagerly: the update must be ``-2 * lr * g``. The result is kept
    for the process (``force=True`` probes again).
    """
    if force or not _hook_checked:
        _hook_checked[:] = [_probe_aggregation_hook()]
    problem = _hook_checked[0]
    if problem:
        raise _hook_error(problem)


def _probe_aggregation_hook():
    """Runs the probe in a thread of its own: eager, outside any strategy scope or trace."""
    result = []
    thread = threading.Thread(target=lambda: result.append(_probe_in_this_thread()))
    thread.start()
    thread.join()
    return result[0]


def _probe_in_this_thread():
    calls = []

    def double(gradients, variables):
        calls.append(len(gradients))
        return [2.0 * g for g in gradients]

    try:
        variable = keras.Variable(1.0, name="probe")
        probe = keras.optimizers.SGD(learning_rate=0.25)
        probe._all_reduce_sum_gradients = aggregation_hook(
            type(probe)._all_reduce_sum_gradients.__get__(probe), double
        )
        probe.apply([tf.constant(1.0)], [variable])
        value = float(variable.numpy())
    except Exception as error:  # noqa: BLE001 - any failure means the hook moved
        return f"a probe optimizer failed: {type(error).__name__}: {error}"
    if not calls:
        return "`Optimizer.apply` no longer calls `_all_reduce_sum_gradients`"
    if abs(value - 0.5) > 1e-6:
        return f"`Optimizer.apply` ignores what `_all_reduce_sum_gradients` returns (probe weight {value}, expected 0.5)"
    return None


# -- optimizer state Keras' own subclasses read --------------------------------------------


@_private("`Optimizer._get_variable_index`")
def variable_index(optimizer, variable):
    """The position of ``variable`` in the list ``optimizer`` was built with."""
    return optimizer._get_variable_index(variable)


@_private("`Optimizer._use_weight_decay`")
def uses_weight_decay(optimizer, variable):
    """Whether ``optimizer.exclude_from_weight_decay`` leaves ``variable`` decayed."""
    return optimizer._use_weight_decay(variable)


# -- trainer and model internals -----------------------------------------------------------


@_private("`Trainer._loss_tracker`")
def loss_tracker(model):
    """The ``loss`` metric Keras' own ``train_step`` updates, or ``None`` (not compiled with a loss)."""
    return model._loss_tracker


def set_initial_epoch(model, epoch):
    """Makes the running ``fit`` start at ``epoch`` (as Keras' ``BackupAndRestore`` does), from ``on_train_begin``."""
    model._initial_epoch = epoch


def first_local_batch(batch, strategy):
    """``batch`` with each distributed value replaced by this worker's first replica's value."""

    def first(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    return tf.nest.map_structure(first, batch)


class MultiWorkerSymbolicBuildMixin:
    """Lets ``fit``/``evaluate`` build a model under ``MultiWorkerMirroredStrategy``.

    Keras' ``_maybe_symbolic_build`` reduces the first per-replica batch with
    ``strategy.reduce`` in eager mode, which fails across workers
    (keras-team/keras#20585). The batch only gives shapes for building, so
    this worker's first replica's batch serves as well.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and data_batch is None:
            # Keras 3.10 yields (step, iterator), Keras 3.11 and newer (begin_step, end_step, iterator).
            for *_, epoch_iterator in iterator:
                data_batch = first_local_batch(next(epoch_iterator), self.distribute_strategy)
                break
        return super()._maybe_symbolic_build(data_batch=data_batch)


@_private("`Layer._flatten_layers`")
def all_layers(model, include_self=False):
    """Every layer of ``model``, nested ones included.

    Raises:
        TypeError: ``model`` is not a layer (e.g. an operation of a functional graph, such as ``GetItem``).
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"`{getattr(model, 'name', model)}` ({type(model).__name__}) is a Keras operation, not a layer."
        )
    return list(model._flatten_layers(include_self=include_self, recursive=True))


@contextlib.contextmanager
def calls_replaced(calls):
    """Runs the block with each layer's ``call`` replaced: ``calls`` maps a layer to ``f(inputs, *args, **kwargs)``.

    Keras runs a layer's computation through ``self.call`` (``Operation.__call__``),
    so an attribute on the instance takes the class method's place for that
    layer only, wherever the model calls it (inside subclassed blocks too);
    the class and every other instance are untouched, and the attribute goes
    when the block ends. Used while a ``tf.function`` traces a step: the
    traced program keeps what the replacement computed.

    Raises:
        KerasHookError: a layer's ``call`` is already replaced, or, at the
            end of the block, no replacement was reached although the block
            ran (Keras no longer calls ``self.call``).
    """
    reached = []

    def reaching(call):
        def replaced(*args, **kwargs):
            reached.append(True)
            return call(*args, **kwargs)
        return replaced

    for layer in calls:
        if "call" in vars(layer):
            raise KerasHookError(f"Layer {layer.name!r} already has its `call` replaced on the instance.")
    for layer, call in calls.items():
        object.__setattr__(layer, "call", reaching(call))
    try:
        yield
    finally:
        for layer in calls:
            object.__delattr__(layer, "call")
    if calls and not reached:
        raise KerasHookError(
            f"keras_gradops guesses at a layer by replacing its `call` on the instance, but `Layer.__call__` of "
            f"Keras {keras.__version__} did not run it: the guess would silently not happen. {_tested_range()}"
        )


@_private("`KerasTensor._keras_history`")
def producing_layer(tensor):
    """``(layer, node_index)`` of the layer call that produced a functional model's tensor."""
    layer, node_index, _ = tensor._keras_history
    return layer, node_index


@_private("`Operation._inbound_nodes`")
def node_inputs(layer, node_index):
    """The input tensors of one call (node) of ``layer`` in a functional model."""
    return layer._inbound_nodes[node_index].input_tensors


@_private("`keras.src.export.export_utils.get_input_signature`")
def input_signature(model):
    """The input signature Keras' ``export`` would use for ``model``."""
    from keras.src.export import export_utils

    return export_utils.get_input_signature(model)


@_private("`tf.__internal__.distribute.strategy_supports_no_merge_call`")
def strategy_supports_no_merge_call():
    """Whether the current strategy runs optimizer updates without ``merge_call``."""
    return tf.__internal__.distribute.strategy_supports_no_merge_call()


@_private("`tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext`")
def compiled_by_xla():
    """Whether the function being traced will be compiled by XLA (``jit_compile=True``)."""
    from tensorflow.python.framework.ops import get_default_graph
    from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext

    return bool(GraphOrParentsInXlaContext(get_default_graph()))
