"""Pure, XLA-compatible gradient transformations over lists of gradients.

Every function accepts ``None`` entries and ``tf.IndexedSlices`` and works
inside ``tf.function(jit_compile=True)``. The optimizers and the custom
train steps of this package are built on them.
"""

from keras_gradops.ops.adaptive_clipping import adaptive_clip, unitwise_norm
from keras_gradops.ops.centralization import (
    centralization_axes,
    centralize,
    centralize_gradients,
)
from keras_gradops.ops.clipping import (
    clip_by_global_norm,
    clip_by_norm,
    clip_by_value,
    global_norm,
)
from keras_gradops.ops.finite import all_finite

__all__ = [
    "adaptive_clip",
    "all_finite",
    "centralization_axes",
    "centralize",
    "centralize_gradients",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "global_norm",
    "unitwise_norm",
]
