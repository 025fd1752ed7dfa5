"""The gradient ops a custom train step applies, checked when they are made.

One step, on the gradient summed over replicas:

1. clipping, at most one of: global norm (``global_clipnorm``), per-tensor
   norm (``clipnorm``), value (``clipvalue``), adaptive (``adaptive_clipping``,
   AGC, Brock et al. 2021);
2. gradient centralization per output unit (``centralize``, Yong et al.,
   ECCV 2020), of every weight of rank >= 2 or, with ``conv_only``, of
   convolution kernels only.

The same order as the optimizers of :mod:`keras_gradops.optimizers`, built on
the same :mod:`keras_gradops.ops`.
"""

import dataclasses

import tensorflow as tf

from keras_gradops.ops import (
    adaptive_clip,
    centralize_gradients,
    clip_by_global_norm,
    clip_by_norm,
    clip_by_value,
    global_norm,
)
from keras_gradops.ops._dtypes import to_float32, values_of
from keras_gradops.ops.clipping import is_positive_number
from keras_gradops.optimizers.validation import validate_fan_in_axes

CLIPPING_OPTIONS = ("global_clipnorm", "clipnorm", "clipvalue", "adaptive_clipping")


@dataclasses.dataclass(frozen=True)
class GradientOps:
    """Validated gradient-op options and their application to a gradient list.

    Args:
        global_clipnorm: clip the global norm to this (``tf.clip_by_global_norm``).
        clipnorm: clip each gradient tensor's norm to this.
        clipvalue: clip each element to ``[-clipvalue, clipvalue]``.
        adaptive_clipping: AGC's ``lambda``: clip each output unit's gradient
            norm to ``lambda * max(||W_i||, adaptive_clipping_eps)``.
        adaptive_clipping_eps: AGC's floor on the weight norm.
        centralize: subtract each output unit's mean gradient (GC).
        conv_only: with ``centralize``, centralize convolution kernels only
            (rank >= 4), as the reference ``GCC`` optimizers.
        fan_in_axes: ``{variable.path: axes or None}`` for weights whose output
            unit is not the last axis; ``None`` reads it from the wrapped model
            with :func:`keras_gradops.fan_in_axes`.

    Raises:
        ValueError: a threshold is not a positive number, more than one clipping
            option is set, ``conv_only`` is set without ``centralize``, or
            ``fan_in_axes`` is malformed.
    """

    global_clipnorm: float | None = None
    clipnorm: float | None = None
    clipvalue: float | None = None
    adaptive_clipping: float | None = None
    adaptive_clipping_eps: float = 1e-3
    centralize: bool = False
    conv_only: bool = False
    fan_in_axes: dict | None = None

    def __post_init__(self):
        for name in (*CLIPPING_OPTIONS, "adaptive_clipping_eps"):
            value = getattr(self, name)
            if value is not None and not is_positive_number(value):
                raise ValueError(f"`{name}` must be a positive number or None. Received: {name}={value!r}")
        chosen = [f"{n}={getattr(self, n)}" for n in CLIPPING_OPTIONS if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise ValueError(
                "Only one of `global_clipnorm`, `clipnorm`, `clipvalue` and `adaptive_clipping` "
                f"can be set. Received: {', '.join(chosen)}"
            )
        for name in ("centralize", "conv_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool. Received: {name}={getattr(self, name)!r}")
        if self.conv_only and not self.centralize:
            raise ValueError(
                "`conv_only=True` chooses which weights are centralized; it needs "
                "`centralize=True`. Received: centralize=False, conv_only=True"
            )
        object.__setattr__(self, "fan_in_axes", validate_fan_in_axes(self.fan_in_axes))

    @property
    def clips(self):
        """Whether any clipping option is set."""
        return any(getattr(self, n) is not None for n in CLIPPING_OPTIONS)

    def get_config(self):
        return dataclasses.asdict(self)

    def apply(self, gradients, variables, fan_in_axes=None):
        """Clips, then centralizes ``gradients``.

        Args:
            gradients: list of tensors, ``tf.IndexedSlices`` or ``None``,
                aligned with ``variables``.
            variables: the trainable variables.
            fan_in_axes: the mapping used when the options hold none.

        Returns:
            ``(gradients, pre_clip_global_norm, clipped)``: the transformed
            list, the float32 global norm of the input, and a bool scalar
            telling whether clipping changed the gradient this step.
        """
        fan_in_axes = self.fan_in_axes if self.fan_in_axes is not None else fan_in_axes
        if self.global_clipnorm is not None:
            gradients, norm = clip_by_global_norm(gradients, self.global_clipnorm)
            clipped = norm > self.global_clipnorm
        else:
            norm = global_norm(gradients)
            gradients, clipped = self._clip(gradients, variables, fan_in_axes)
        if self.centralize:
            gradients = centralize_gradients(gradients, variables, self.conv_only, fan_in_axes)
        return gradients, norm, clipped

    def _clip(self, gradients, variables, fan_in_axes):
        present = [values_of(g) for g in gradients if g is not None]
        if self.clipnorm is not None:
            clipped = _any([tf.norm(to_float32(g)) > self.clipnorm for g in present])
            return clip_by_norm(gradients, self.clipnorm), clipped
        if self.clipvalue is not None:
            clipped = _any([tf.reduce_max(tf.abs(g)) > self.clipvalue for g in present])
            return clip_by_value(gradients, self.clipvalue), clipped
        if self.adaptive_clipping is not None:
            new = adaptive_clip(
                gradients, variables, self.adaptive_clipping, self.adaptive_clipping_eps, fan_in_axes
            )
            # AGC scales a unit by exactly 1.0 when it is within bounds.
            changed = [
                tf.reduce_any(tf.not_equal(values_of(n), values_of(g)))
                for n, g in zip(new, gradients)
                if g is not None
            ]
            return new, _any(changed)
        return gradients, tf.constant(False)


def _any(flags):
    return tf.reduce_any(tf.stack(flags)) if flags else tf.constant(False)
