"""keras_gradops: gradient clipping, gradient centralization and forward-mode
guessed gradients for TensorFlow / Keras 3.

    import keras_gradops as kgo
    model.compile(optimizer=kgo.SGDGC(learning_rate=0.1, momentum=0.9), ...)
"""

import keras

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "keras_gradops needs the TensorFlow backend of Keras (KERAS_BACKEND=tensorflow); "
        f"the active backend is {keras.backend.backend()!r}."
    )

from keras_gradops import callbacks, cluster, layers, ops, serving  # noqa: E402
from keras_gradops.fan_in import fan_in_axes  # noqa: E402
from keras_gradops.serving import export_for_serving  # noqa: E402
from keras_gradops.thresholds import AutoClip, ZClip  # noqa: E402
from keras_gradops.training import GradientOpsModel, GradientWrapperModel  # noqa: E402
from keras_gradops.training.guessed import GuessedGradientModel  # noqa: E402
from keras_gradops.optimizers import (  # noqa: E402
    SGDGC,
    SGDGCC,
    SGDWGC,
    SGDWGCC,
    AdagradGC,
    AdagradGCC,
    AdamGC,
    AdamGCC,
    AdamWGC,
    AdamWGCC,
    centralized_class,
    with_gradient_centralization,
)

__version__ = "0.1.0"

__all__ = [
    "AutoClip", "GradientOpsModel", "GradientWrapperModel", "GuessedGradientModel", "ZClip",
    "SGDGC", "SGDGCC", "SGDWGC", "SGDWGCC", "AdamGC", "AdamGCC", "AdamWGC", "AdamWGCC",
    "AdagradGC", "AdagradGCC", "callbacks", "centralized_class", "cluster", "export_for_serving", "fan_in_axes", "layers", "ops", "serving",
    "with_gradient_centralization",
]
