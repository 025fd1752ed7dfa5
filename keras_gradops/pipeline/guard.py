"""Skipping a step whose aggregated gradient is not finite, decided before the all-reduce.

A skipped step changes no weight and no optimizer variable: ``iterations``
does not advance, the learning-rate schedule and the moving averages do not
move, as Keras' ``LossScaleOptimizer`` skips a step. The decision must be
taken before ``optimizer.apply`` (which sums the replicas' gradients and
updates in one go), yet concern the SUM of the replicas' gradients. Each
replica therefore checks its own gradient and the replicas agree with one
scalar all-reduce (the gradient itself is still reduced once, by the
optimizer):

- a replica's gradient is *safe* if its global norm ``n_r`` is finite and at
  most ``sqrt(float32 max) / (2 R)`` (about ``9.2e18 / R``), ``R`` replicas;
- the step is applied iff every replica's gradient is safe. Then the
  aggregated norm ``||sum_r g_r|| <= sum_r n_r`` is below ``sqrt(float32 max)``,
  so it and its square are finite: a NaN/Inf on any replica, or a sum that
  would overflow, skips the step everywhere, counted once.
"""

import math

import numpy as np
import tensorflow as tf

from keras_gradops import replicas
from keras_gradops.ops import global_norm

SAFE_NORM = math.sqrt(float(np.finfo(np.float32).max)) / 2
"""Twice this bounds every aggregated norm the guard lets through."""


def is_safe(gradients):
    """Whether this replica's gradient (a list, ``None`` entries skipped) is finite and not near overflow."""
    norm = global_norm(gradients)
    return tf.logical_and(tf.math.is_finite(norm), norm <= SAFE_NORM / replicas.num_replicas())


def apply_if_finite(apply_fn, gradients, on_skip):
    """Runs ``apply_fn(gradients)`` on every replica if every replica's gradient is safe, else ``on_skip()``.

    Args:
        apply_fn: ``gradients -> None``, e.g. ``optimizer.apply``; may update
            variables and synchronise replicas.
        gradients: this replica's gradient list.
        on_skip: ``() -> None``, run once (in cross-replica context under a
            ``merge_call`` strategy) when the step is skipped.

    Returns:
        The bool scalar decision, the same on every replica.
    """
    applied = replicas.all_replicas(is_safe(gradients))
    replicas.run_if(applied, apply_fn, on_skip, args=(gradients,))
    return applied
