"""Loss scaling (mixed precision) around a custom gradient step.

Keras scales the loss with ``optimizer.scale_loss`` inside the tape and lets
``optimizer.apply`` divide the gradients back: by ``loss_scale_factor``, or,
for ``keras.optimizers.LossScaleOptimizer`` (made by ``compile`` under
``mixed_float16``), by its dynamic scale, after a finiteness check that reads
the first replica only. A gradient source here returns the unscaled
gradient; the train step applies it with the optimizer inside the
``LossScaleOptimizer`` (multiplied back by a static ``loss_scale_factor``,
which that optimizer divides out again) and adapts the dynamic scale as
``LossScaleOptimizer`` does: halve it after a non-finite step, double it
after ``dynamic_growth_steps`` finite steps in a row.
"""

import keras
import tensorflow as tf

from keras_gradops.ops._dtypes import map_values


def _is_dynamic(optimizer):
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def loss_scale(optimizer):
    """The factor ``optimizer.scale_loss`` multiplies the loss by, or ``None``."""
    if _is_dynamic(optimizer):
        return optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
    return optimizer.loss_scale_factor


def unscale(gradients, scale):
    """``g / scale`` for every gradient (``None`` kept); identity for ``scale=None``."""
    if scale is None:
        return list(gradients)

    def divide(values):
        return values / tf.cast(scale, values.dtype)

    return [None if g is None else map_values(g, divide) for g in gradients]


def updating_optimizer(optimizer):
    """The optimizer whose ``apply`` updates the weights: the inner one of a LossScaleOptimizer."""
    return optimizer.inner_optimizer if _is_dynamic(optimizer) else optimizer


def for_apply(gradients, optimizer):
    """Unscaled gradients as ``optimizer.apply`` expects them: times its ``loss_scale_factor``, if any."""
    factor = optimizer.loss_scale_factor
    if factor is None:
        return list(gradients)

    def multiply(values):
        return values * tf.cast(factor, values.dtype)

    return [None if g is None else map_values(g, multiply) for g in gradients]


def after_finite_step(optimizer):
    """Counts a finite step; doubles the dynamic scale every ``dynamic_growth_steps``."""
    if not _is_dynamic(optimizer):
        return
    counter = optimizer.step_counter
    grow = tf.equal(counter, optimizer.dynamic_growth_steps - 1)
    optimizer.step_counter.assign(tf.where(grow, tf.zeros_like(counter), counter + 1))
    optimizer.dynamic_scale.assign(
        tf.where(grow, optimizer.dynamic_scale * 2.0, optimizer.dynamic_scale)
    )


def after_nonfinite_step(optimizer):
    """Halves the dynamic scale and restarts the growth count."""
    if not _is_dynamic(optimizer):
        return
    optimizer.step_counter.assign(0)
    optimizer.dynamic_scale.assign(optimizer.dynamic_scale * 0.5)
