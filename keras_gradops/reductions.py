"""Counts the cross-replica reductions a traced step makes: is the gradient all-reduced once?

    counts = train_step_reductions(model, (tf.TensorSpec((None, 4)), tf.TensorSpec((None, 3))))

Two independent counts of one trace of ``fn``:

- every value handed to ``strategy.extended.batch_reduce_to`` / ``reduce_to``
  (the public entry points every all-reduce of ``tf.distribute`` goes
  through), with its bytes: the instance's methods are wrapped for the
  duration of the trace only;
- the collective all-reduce ops in the traced graph and its nested functions
  (``CollectiveReduceV2``/``CollectiveReduce``/``NcclAllReduce``), for a
  strategy that reduces with collectives (``MultiWorkerMirroredStrategy``).
"""

import numpy as np
import tensorflow as tf

COLLECTIVE_OPS = {"CollectiveReduceV2", "CollectiveReduce", "CollectiveReduceV3", "NcclAllReduce"}


def _value_bytes(value):
    component = value
    if isinstance(value, tf.distribute.DistributedValues):
        component = value.values[0]
    if isinstance(component, tf.IndexedSlices):
        component = component.values
    shape = component.shape
    if not shape.is_fully_defined():
        return None
    return int(np.prod(shape.as_list(), dtype=np.int64)) * component.dtype.size


def _graph_collectives(graph_def):
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return sum(node.op in COLLECTIVE_OPS for node in nodes)


def count_reductions(strategy, fn, *input_signature):
    """Traces ``tf.function(fn)`` once for ``input_signature``; returns the counts as a dict.

    Args:
        strategy: the ``tf.distribute`` strategy ``fn`` runs under.
        fn: the step, e.g. ``lambda data: strategy.run(model.train_step, args=(data,))``.
        *input_signature: ``tf.TensorSpec`` structures of ``fn``'s arguments.

    Returns:
        ``{"values": n, "bytes": [...], "graph_collectives": m}``: ``bytes``
        lists each reduced value's size (``None`` if not static), largest first.
    """
    extended = strategy.extended
    reduced = []
    batch_reduce_to, reduce_to = extended.batch_reduce_to, extended.reduce_to

    def counting_batch_reduce_to(reduce_op, value_destination_pairs, options=None):
        reduced.extend(_value_bytes(value) for value, _ in value_destination_pairs)
        return batch_reduce_to(reduce_op, value_destination_pairs, options)

    def counting_reduce_to(reduce_op, value, destinations, options=None):
        reduced.append(_value_bytes(value))
        return reduce_to(reduce_op, value, destinations, options)

    extended.batch_reduce_to, extended.reduce_to = counting_batch_reduce_to, counting_reduce_to
    try:
        concrete = tf.function(fn).get_concrete_function(*input_signature)
    finally:
        del extended.batch_reduce_to, extended.reduce_to
    return {
        "values": len(reduced),
        "bytes": sorted(reduced, key=lambda b: -1 if b is None else b, reverse=True),
        "graph_collectives": _graph_collectives(concrete.graph.as_graph_def()),
    }


def train_step_reductions(model, *input_signature):
    """:func:`count_reductions` of one ``model.train_step`` run on every replica of its strategy.

    The model must be compiled, its optimizer built, and (for the wrapper
    models of this package) its train function made, as ``fit`` would.
    """
    strategy = model.distribute_strategy
    return count_reductions(strategy, lambda data: strategy.run(model.train_step, args=(data,)), *input_signature)
