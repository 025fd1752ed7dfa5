"""Adam with gradient centralization: ``AdamGC``, ``AdamGCC``, ``AdamWGC``, ``AdamWGCC``.

Mirrors ``Adam_GC(C)`` (L2 weight decay in the gradient) and ``AdamW_GC(C)``
(decoupled decay) of the reference implementation of Yong et al., "Gradient
Centralization", ECCV 2020 (arXiv:2004.01461), on Keras' Adam update rule.

``centralization="update"`` is the reference's "GC2" variant, which its
authors recommend for adaptive methods: instead of the gradient, the final
update ``alpha * m / (sqrt(v) + epsilon)`` (plus ``lr * weight_decay * w`` in
the W classes) is centralized per output unit.
"""

import keras
import tensorflow as tf

from keras_gradops import keras_internals
from keras_gradops.arguments import check_choice
from keras_gradops.optimizers.base import GradientChainMixin

_register = keras.saving.register_keras_serializable(package="keras_gradops")
CENTRALIZATION_TARGETS = ("gradient", "update")

_ARGS = """
    Args:
        learning_rate: positive float, schedule or callable. Defaults to 0.001.
        beta_1, beta_2, epsilon, amsgrad: Keras' Adam arguments and defaults.
        weight_decay: {weight_decay}
        centralization: ``"gradient"`` (default) centralizes the gradient before
            both moment updates; ``"update"`` (the reference's GC2) centralizes
            the final update ``alpha * m / (sqrt(v) + epsilon)`` instead.
        fan_in_axes, skip_nonfinite, clipnorm, clipvalue, global_clipnorm,
        and the other Keras arguments: as in ``keras_gradops.SGDGC``.
"""
_L2 = "L2 penalty added before centralization, ``g <- GC(g + weight_decay * w)``."
_DECOUPLED = ("Keras' decoupled decay ``w <- w - lr * weight_decay * w`` "
              "(Keras' AdamW default 0.004); centralization sees the raw gradient.")


class CentralizedUpdateMixin:
    """Adds the ``centralization`` choice (gradient or final update) to an Adam class.

    With ``"update"`` (the reference's GC2), Keras' own Adam ``update_step``
    runs on the weight, and its whole change is then centralized:
    ``w <- w0 - GC(w0 - w_Adam)``, where ``w0`` is the weight before Keras'
    decoupled decay (so the decay term ``lr * wd * w0`` is centralized with
    the Adam step, as in the reference ``AdamW_GC2``). Since only the mean
    over each unit changes, ``w <- w_Adam + mean(w0 - w_Adam)``.
    """

    def __init__(self, *args, centralization="gradient", **kwargs):
        check_choice(centralization, "centralization", CENTRALIZATION_TARGETS)
        super().__init__(*args, **kwargs)
        self.centralization = centralization
        self.chain.centralize = self.centralize_gradient

    @property
    def centralize_gradient(self):
        return self.centralization == "gradient"

    def update_step(self, gradient, variable, learning_rate):
        if self.centralize_gradient:
            return super().update_step(gradient, variable, learning_rate)
        axes = self.chain.centralization_axes(keras_internals.variable_index(self, variable))
        before = tf.identity(variable)  # after Keras' decoupled decay: w1 = (1 - lr * wd) * w0
        super().update_step(gradient, variable, learning_rate)
        if axes is None:
            return
        change = before - variable  # the Adam step
        if self.weight_decay is not None and keras_internals.uses_weight_decay(self, variable):
            decay = tf.cast(learning_rate, variable.dtype) * tf.cast(self.weight_decay, variable.dtype)
            change = change + decay / (1 - decay) * before  # + lr * wd * w0
        mean = tf.reduce_mean(change, axis=list(axes), keepdims=True)
        self.assign_add(variable, tf.broadcast_to(mean, tf.shape(change)))

    def get_config(self):
        config = super().get_config()
        config["centralization"] = self.centralization
        return config


@_register
class AdamGC(CentralizedUpdateMixin, GradientChainMixin, keras.optimizers.Adam):
    __doc__ = """Adam with gradient centralization of dense and convolution kernels.

    Per step, for each weight of rank > 1: ``g <- GC(g + weight_decay * w)``,
    then Keras' Adam: ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``,
    ``w <- w - lr sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + epsilon)``.

    Reference: Yong et al., "Gradient Centralization", ECCV 2020 (``Adam_GC``).
    """ + _ARGS.format(weight_decay=_L2)

    weight_decay_is_l2 = True


@_register
class AdamGCC(AdamGC):
    __doc__ = """``AdamGC`` that centralizes convolution kernels only (rank >= 4).

    Reference: Yong et al., "Gradient Centralization", ECCV 2020 (``Adam_GCC``).
    """ + _ARGS.format(weight_decay=_L2)

    conv_only = True


@_register
class AdamWGC(CentralizedUpdateMixin, GradientChainMixin, keras.optimizers.AdamW):
    __doc__ = """AdamW (decoupled weight decay) with gradient centralization.

    Per step: ``w <- w - lr * weight_decay * w``, the raw gradient of each
    rank > 1 weight centralized per output unit, then Keras' Adam update.

    Reference: Yong et al., "Gradient Centralization", ECCV 2020 (``AdamW_GC``).
    """ + _ARGS.format(weight_decay=_DECOUPLED)


@_register
class AdamWGCC(AdamWGC):
    __doc__ = """``AdamWGC`` that centralizes convolution kernels only (rank >= 4).

    Reference: Yong et al., "Gradient Centralization", ECCV 2020 (``AdamW_GCC``).
    """ + _ARGS.format(weight_decay=_DECOUPLED)

    conv_only = True
