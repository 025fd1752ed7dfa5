"""SGD with gradient centralization: ``SGDGC``, ``SGDGCC``, ``SGDWGC``, ``SGDWGCC``.

Mirrors ``SGD_GC``, ``SGD_GCC``, ``SGDW_GC`` and ``SGDW_GCC`` of the reference
implementation of Yong et al., "Gradient Centralization", ECCV 2020
(arXiv:2004.01461), on Keras' ``SGD`` update rule.
"""

import keras

from keras_gradops.optimizers.base import GradientChainMixin

_register = keras.saving.register_keras_serializable(package="keras_gradops")

_SGD_ARGS = """
    Args:
        learning_rate: positive float, ``LearningRateSchedule`` or callable.
            Defaults to 0.01.
        momentum: float in [0, 1]; 0 is plain SGD. Defaults to 0.
        nesterov: whether to use Nesterov momentum. Defaults to ``False``.
        weight_decay: {weight_decay}
        fan_in_axes: optional ``{{variable.path: axes or None}}`` for weights
            whose output unit is not the last axis; without it each weight's
            layer (``Conv2DTranspose``, ``DepthwiseConv2D``, ``EinsumDense``,
            ``Embedding``, ...) is looked up when the optimizer is built.
            ``keras_gradops.fan_in_axes(model)`` builds the mapping.
        skip_nonfinite: if ``True``, a step whose aggregated gradient holds a
            NaN or Inf changes nothing (weights, slots, ``iterations``) and is
            counted in ``skipped_steps``.
        clipnorm, clipvalue, global_clipnorm: clip the raw gradient, after
            the cross-replica all-reduce, before L2 and centralization. The
            pre-clip global norm of the last step is in ``grad_norm``, the
            threshold of ``global_clipnorm`` in ``grad_clip_threshold``.
        adaptive_clipping, adaptive_clipping_eps: adaptive gradient clipping
            (AGC, Brock et al. 2021) of each output unit instead: its gradient
            norm is kept below ``adaptive_clipping * max(||W_i||, eps)``.
        use_ema, ema_momentum, ema_overwrite_frequency, loss_scale_factor,
        gradient_accumulation_steps, name: as in ``keras.optimizers.SGD``.
"""
_L2 = ("non-negative float: L2 penalty added to the gradient before "
       "centralization, ``g <- GC(g + weight_decay * w)``.")
_DECOUPLED = ("non-negative float: Keras' decoupled decay, "
              "``w <- w - lr * weight_decay * w``; centralization sees the raw gradient.")


@_register
class SGDGC(GradientChainMixin, keras.optimizers.SGD):
    __doc__ = """SGD with gradient centralization of dense and convolution kernels.

    Per step, for each weight ``w`` of rank > 1 with gradient ``g``:
    ``g <- g + weight_decay * w`` (L2), ``g <- g - mean(g)`` over each output
    unit's fan-in, then Keras' SGD/momentum/Nesterov update. Biases and other
    rank-1 weights are updated exactly as by ``keras.optimizers.SGD`` (with L2).

    Reference: Yong et al., "Gradient Centralization", ECCV 2020 (``SGD_GC``).
    """ + _SGD_ARGS.format(weight_decay=_L2)

    weight_decay_is_l2 = True


@_register
class SGDGCC(SGDGC):
    __doc__ = """``SGDGC`` that centralizes convolution kernels only (rank >= 4).

    Reference: Yong et al., "Gradient Centralization", ECCV 2020 (``SGD_GCC``).
    """ + _SGD_ARGS.format(weight_decay=_L2)

    conv_only = True


@_register
class SGDWGC(GradientChainMixin, keras.optimizers.SGD):
    __doc__ = """SGD with decoupled weight decay and gradient centralization.

    Per step: ``w <- w - lr * weight_decay * w``, then the raw gradient of each
    rank > 1 weight is centralized per output unit and Keras' SGD update runs.

    Reference: Yong et al., "Gradient Centralization", ECCV 2020 (``SGDW_GC``).
    """ + _SGD_ARGS.format(weight_decay=_DECOUPLED)


@_register
class SGDWGCC(SGDWGC):
    __doc__ = """``SGDWGC`` that centralizes convolution kernels only (rank >= 4).

    Reference: Yong et al., "Gradient Centralization", ECCV 2020 (``SGDW_GCC``).
    """ + _SGD_ARGS.format(weight_decay=_DECOUPLED)

    conv_only = True
