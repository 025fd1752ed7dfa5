"""Replica-context helpers for steps that work on the gradient summed over replicas.

Under ``tf.distribute`` each replica computes the gradient of its share of
the global batch; the gradient of the whole batch is their sum, which Keras'
optimizer forms in ``apply`` with the step's one all-reduce. Decisions taken
before that all-reduce (skip a non-finite step) need a value every replica
agrees on; conditional updates need ``merge_call`` (an optimizer update
synchronises replicas, which ``tf.distribute`` forbids inside a ``tf.cond``
in replica context).
"""

import tensorflow as tf

from keras_gradops import keras_internals


def _replica_context():
    """The current replica context if more than one replica runs, else ``None``."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def num_replicas():
    """Replicas in sync under the current strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_id():
    """This replica's index in the sync group (a scalar tensor), or ``None`` on one replica."""
    context = _replica_context()
    return None if context is None else context.replica_id_in_sync_group


def is_first_replica():
    """A bool scalar: ``True`` on replica 0 (and when not distributed)."""
    context = _replica_context()
    if context is None:
        return tf.constant(True)
    return tf.equal(context.replica_id_in_sync_group, 0)


def all_replicas(flag):
    """``True`` on every replica iff ``flag`` is ``True`` on every replica (one scalar all-reduce)."""
    context = _replica_context()
    if context is None:
        return flag
    failures = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(flag), tf.float32))
    return tf.equal(failures, 0.0)


def run_if(condition, true_fn, false_fn, args=()):
    """``tf.cond(condition, lambda: true_fn(*args), false_fn)`` where ``true_fn`` may update an optimizer.

    As Keras' ``LossScaleOptimizer`` does, the condition is evaluated in
    cross-replica context under a strategy that uses ``merge_call``:
    ``true_fn`` then runs on every replica with that replica's ``args``,
    ``false_fn`` once. ``condition`` must be the same on every replica.
    """
    if _replica_context() is None or keras_internals.strategy_supports_no_merge_call():
        tf.cond(condition, lambda: _none(true_fn, *args), lambda: _none(false_fn))
        return

    def cross_replica(distribution, condition, *args):
        first = distribution.experimental_local_results(condition)[0]
        tf.cond(
            first,
            lambda: _none(distribution.extended.call_for_each_replica, true_fn, args),
            lambda: _none(false_fn),
        )

    tf.distribute.get_replica_context().merge_call(cross_replica, args=(condition, *args))


def _none(fn, *args):
    fn(*args)
    return None
