"""GradientOpsModel: backprop training with gradient ops and telemetry.

    model = kgo.GradientOpsModel(net, global_clipnorm=1.0, centralize=True, skip_nonfinite=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=..., jit_compile=True)
    history = model.fit(...)   # logs: loss, ..., grad_norm, clipped_fraction, skipped_steps
"""

import keras

from keras_gradops.training.wrapper import GradientWrapperModel


@keras.saving.register_keras_serializable(package="keras_gradops")
class GradientOpsModel(GradientWrapperModel):
    """Trains a Keras model by backprop, applying gradient ops with any Keras optimizer.

    Clipping (global-norm, per-tensor, value or adaptive, Brock et al. 2021)
    and gradient centralization (Yong et al., ECCV 2020) run on the gradient
    summed over replicas, before ``optimizer.apply``; the pre-clip norm,
    the share of clipped steps and the skipped non-finite steps are logged
    as epoch means. All arguments are those of
    :class:`~keras_gradops.training.wrapper.GradientWrapperModel`.

    Example:
        >>> net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> model = GradientOpsModel(net, global_clipnorm=1.0, centralize=True)
        >>> model.compile(optimizer="sgd", loss="mse")
    """
