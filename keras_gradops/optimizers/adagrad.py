"""Adagrad with gradient centralization: ``AdagradGC``, ``AdagradGCC``.

Mirrors ``Adagrad_GC`` and ``Adagrad_GCC`` of the reference implementation of
Yong et al., "Gradient Centralization", ECCV 2020 (arXiv:2004.01461): L2
weight decay added to the gradient, centralization before the accumulator.
"""

import keras

from keras_gradops.optimizers.base import GradientChainMixin

_register = keras.saving.register_keras_serializable(package="keras_gradops")

_ARGS = """
    Args:
        learning_rate: positive float, schedule or callable. Defaults to 0.001.
        initial_accumulator_value: non-negative float. Defaults to 0.1.
        epsilon: non-negative float. Defaults to 1e-7.
        weight_decay: L2 penalty added before centralization,
            ``g <- GC(g + weight_decay * w)``.
        fan_in_axes, skip_nonfinite, clipnorm, clipvalue, global_clipnorm,
        adaptive_clipping, adaptive_clipping_eps,
        and the other Keras arguments: as in ``keras_gradops.SGDGC``.
"""


@_register
class AdagradGC(GradientChainMixin, keras.optimizers.Adagrad):
    __doc__ = """Adagrad with gradient centralization of dense and convolution kernels.

    Per step: ``g <- GC(g + weight_decay * w)``, ``a <- a + g^2``,
    ``w <- w - lr * g / sqrt(a + epsilon)`` (Keras' Adagrad).

    Reference: Yong et al., "Gradient Centralization", ECCV 2020 (``Adagrad_GC``).
    """ + _ARGS

    weight_decay_is_l2 = True


@_register
class AdagradGCC(AdagradGC):
    __doc__ = """``AdagradGC`` that centralizes convolution kernels only (rank >= 4).

    Reference: Yong et al., "Gradient Centralization", ECCV 2020 (``Adagrad_GCC``).
    """ + _ARGS

    conv_only = True
