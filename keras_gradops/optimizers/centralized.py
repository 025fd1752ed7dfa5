"""Gradient centralization on any Keras optimizer, in one line.

    optimizer = keras_gradops.with_gradient_centralization(keras.optimizers.Lion(1e-4))

returns an instance of ``CentralizedLion``: the same class and hyperparameters,
with the gradient centralized per output unit (Yong et al., ECCV 2020,
arXiv:2004.01461) after clipping and before the optimizer's own update, and
with clipping applied to the aggregated gradient under ``tf.distribute``.
Keras' ``weight_decay`` stays decoupled, as in the base optimizer.

The classes for Keras' built-in optimizers are registered when
``keras_gradops`` is imported, so saved models load without
``custom_objects``. For an optimizer class of your own, call
:func:`centralized_class` on it before loading a saved model.
"""

import keras

from keras_gradops.arguments import check_bool
from keras_gradops.optimizers.base import GradientChainMixin

BUILTIN_OPTIMIZERS = (
    "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax",
    "Ftrl", "Lamb", "Lion", "Muon", "Nadam", "RMSprop", "SGD",
)
_UNSUPPORTED = (keras.optimizers.LossScaleOptimizer,)
_CLASSES = {}


class ConvOnlyArgumentMixin:
    """Makes ``conv_only`` a constructor argument instead of a class attribute."""

    def __init__(self, *args, conv_only=False, **kwargs):
        check_bool(conv_only, "conv_only")
        super().__init__(*args, **kwargs)
        self.conv_only = conv_only
        self.chain.selection.conv_only = conv_only

    def get_config(self):
        config = super().get_config()
        config["conv_only"] = self.conv_only
        return config


def centralized_class(optimizer_class):
    """The registered ``Centralized<Name>`` subclass of a Keras optimizer class.

    Args:
        optimizer_class: a subclass of ``keras.optimizers.Optimizer`` whose
            ``update_step(gradient, variable, learning_rate)`` updates one
            variable at a time.

    Returns:
        The class, created and registered (package ``keras_gradops``) once.

    Raises:
        TypeError: not an optimizer class, a ``LossScaleOptimizer`` (wrap the
            inner optimizer instead), or already centralized.
    """
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, keras.optimizers.Optimizer)):
        raise TypeError(
            "`optimizer_class` must be a subclass of keras.optimizers.Optimizer. "
            f"Received: optimizer_class={optimizer_class!r}"
        )
    if issubclass(optimizer_class, GradientChainMixin):
        raise TypeError(f"`{optimizer_class.__name__}` already centralizes gradients.")
    if issubclass(optimizer_class, _UNSUPPORTED):
        raise TypeError(
            f"`{optimizer_class.__name__}` wraps another optimizer: centralize the inner "
            "optimizer; Keras adds loss scaling around it under `mixed_float16`."
        )
    if optimizer_class not in _CLASSES:
        name = f"Centralized{optimizer_class.__name__}"
        cls = type(name, (ConvOnlyArgumentMixin, GradientChainMixin, optimizer_class), {
            "__doc__": f"``{optimizer_class.__name__}`` with gradient centralization; "
                       "see ``keras_gradops.with_gradient_centralization``.",
            "__module__": __name__,
        })
        _CLASSES[optimizer_class] = keras.saving.register_keras_serializable(
            package="keras_gradops", name=name)(cls)
    return _CLASSES[optimizer_class]


def with_gradient_centralization(optimizer, conv_only=False, fan_in_axes=None, skip_nonfinite=False):
    """Returns a copy of ``optimizer`` that centralizes gradients per output unit.

    ``g <- g - mean(g)`` over each output unit's fan-in, for every weight of
    rank > 1 (rank >= 4 with ``conv_only``), on the clipped, aggregated
    gradient, before the optimizer's update.

    Args:
        optimizer: an unbuilt ``keras.optimizers.Optimizer`` instance.
        conv_only: centralize convolution kernels only (the reference ``GCC``).
        fan_in_axes: optional ``{variable.path: axes or None}``, e.g. from
            ``keras_gradops.fan_in_axes(model)``.
        skip_nonfinite: skip steps whose gradient holds NaN/Inf.

    Returns:
        A new, unbuilt optimizer with the same hyperparameters.

    Example:
        >>> opt = with_gradient_centralization(keras.optimizers.Lion(learning_rate=0.5))
        >>> type(opt).__name__, float(opt.learning_rate), isinstance(opt, keras.optimizers.Lion)
        ('CentralizedLion', 0.5, True)
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"`optimizer` must be a Keras optimizer instance. Received: optimizer={optimizer!r}")
    if optimizer.built:
        raise ValueError("`optimizer` must not be built yet: centralize it before training starts.")
    cls = centralized_class(type(optimizer))
    config = dict(optimizer.get_config(), conv_only=conv_only,
                  fan_in_axes=fan_in_axes, skip_nonfinite=skip_nonfinite)
    return cls.from_config(config)


for _name in BUILTIN_OPTIMIZERS:
    if hasattr(keras.optimizers, _name):  # an older Keras lacks the newer ones (Muon)
        centralized_class(getattr(keras.optimizers, _name))
