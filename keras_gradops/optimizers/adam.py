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

from keras_gradops.ops.centralization import centralize
from keras_gradops.optimizers.pipeline import GradientPipelineMixin
from keras_gradops.optimizers.validation import validate_centralization

_register = keras.saving.register_keras_serializable(package="keras_gradops")

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
    """Adds the ``centralization`` choice (gradient or final update) to an Adam class."""

    def __init__(self, *args, centralization="gradient", **kwargs):
        validate_centralization(centralization)
        super().__init__(*args, **kwargs)
        self.centralization = centralization

    @property
    def centralize_gradient(self):
        return self.centralization == "gradient"

    def _update_variable(self, grad, var, learning_rate):
        axes = self._axes_of(var)
        if self.centralize_gradient or axes is None:
            super()._update_variable(grad, var, learning_rate)
            return
        self._centralized_update_step(grad, var, learning_rate, axes)

    def _centralized_update_step(self, gradient, variable, learning_rate, axes):
        """Keras' Adam step with ``w <- w - GC(alpha m / (sqrt(v) + eps) [+ lr wd w])``."""
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        gradient = tf.cast(gradient, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        alpha = lr * tf.sqrt(1 - tf.pow(tf.cast(self.beta_2, dtype), step)) / (
            1 - tf.pow(tf.cast(self.beta_1, dtype), step)
        )
        index = self._get_variable_index(variable)
        m = self._momentums[index]
        v = self._velocities[index]
        self.assign_add(m, (gradient - m) * (1 - self.beta_1))
        self.assign_add(v, (tf.square(gradient) - v) * (1 - self.beta_2))
        if self.amsgrad:
            v_hat = self._velocity_hats[index]
            self.assign(v_hat, tf.maximum(v_hat, v))
            v = v_hat
        delta = alpha * m / (tf.sqrt(v) + self.epsilon)
        if self._uses_decoupled_decay(variable):
            delta = delta + lr * tf.cast(self.weight_decay, dtype) * variable
        self.assign_sub(variable, centralize(delta, axes))

    def get_config(self):
        config = super().get_config()
        config["centralization"] = self.centralization
        return config


@_register
class AdamGC(CentralizedUpdateMixin, GradientPipelineMixin, keras.optimizers.Adam):
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
class AdamWGC(CentralizedUpdateMixin, GradientPipelineMixin, keras.optimizers.AdamW):
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
