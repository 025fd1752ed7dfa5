"""Cross-replica helpers for a train step that works on the aggregated gradient.

Under ``tf.distribute.MirroredStrategy`` each replica computes the gradient of
its share of the global batch (Keras divides the loss by the number of
replicas), so the gradient of the whole batch is their SUM. Norms, clipping
and the finiteness check must see that sum; Keras' own clipping sees the
per-replica gradient (DESIGN.md section 4). Keras optimizers all-reduce
(sum) the gradient they receive again, so after the train step has summed it
once, only the first replica hands it on and the others hand on zeros: the
optimizer's sum is then the aggregated gradient exactly.
"""

import tensorflow as tf

from keras_gradops.ops._dtypes import map_values


def _replica_context():
    """The current replica context if more than one replica runs, else ``None``."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def sum_over_replicas(gradients):
    """``sum_r g_r`` on every replica (``None`` entries kept); identity on one replica."""
    context = _replica_context()
    present = [g for g in gradients if g is not None]
    if context is None or not present:
        return list(gradients)
    reduced = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
    return [None if g is None else next(reduced) for g in gradients]


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


def first_replica_only(gradients):
    """Each gradient on replica 0, zeros (same structure) on the others.

    Gives an already aggregated gradient to a Keras optimizer, whose own
    all-reduce (sum) then reproduces it exactly (``x + 0 == x``).
    """
    if _replica_context() is None:
        return list(gradients)
    first = is_first_replica()

    def keep(values):
        return tf.where(first, values, tf.zeros_like(values))

    return [None if g is None else map_values(g, keep) for g in gradients]


def run_if(condition, true_fn, false_fn, args=()):
    """``tf.cond(condition, lambda: true_fn(*args), false_fn)`` that may update an optimizer.

    An optimizer update synchronises replicas (``merge_call``), which
    ``tf.distribute`` forbids inside a ``tf.cond`` in replica context. As
    Keras' ``LossScaleOptimizer`` does, the condition is then evaluated in
    cross-replica context: ``true_fn`` runs on every replica with that
    replica's ``args``, ``false_fn`` once in cross-replica context.
    ``condition`` must be the same on every replica (computed from the
    aggregated gradient).
    """
    if tf.__internal__.distribute.strategy_supports_no_merge_call():
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
