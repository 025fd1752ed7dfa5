"""Construction-time checks of optimizer hyperparameters.

Keras checks few of these, and some only when the first step runs; here each
bad value raises a ``ValueError`` naming the argument when the optimizer is
made.
"""

import numbers

from keras.optimizers.schedules import LearningRateSchedule

CENTRALIZATION_TARGETS = ("gradient", "update")


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _require(condition, name, value, requirement):
    if not condition:
        raise ValueError(f"`{name}` must be {requirement}. Received: {name}={value!r}")


def normalize_learning_rate(value):
    """Checks ``learning_rate`` (> 0, or a schedule/callable); ints become floats."""
    if isinstance(value, LearningRateSchedule) or callable(value):
        return value
    _require(_is_number(value) and value > 0, "learning_rate", value,
             "a positive float, a `LearningRateSchedule` or a callable")
    return float(value)


def validate_hyperparameters(arguments):
    """Raises ``ValueError`` for the first out-of-range entry of ``arguments``."""
    in_unit_interval = ("momentum", "ema_momentum")
    in_half_open_unit_interval = ("beta_1", "beta_2")
    non_negative = ("weight_decay", "epsilon", "initial_accumulator_value")
    positive = ("clipnorm", "clipvalue", "global_clipnorm")
    for name, value in arguments.items():
        if value is None:
            continue
        if name in in_unit_interval:
            _require(_is_number(value) and 0 <= value <= 1, name, value, "a float in [0, 1]")
        elif name in in_half_open_unit_interval:
            _require(_is_number(value) and 0 <= value < 1, name, value, "a float in [0, 1)")
        elif name in non_negative:
            _require(_is_number(value) and value >= 0, name, value, "a non-negative float")
        elif name in positive:
            _require(_is_number(value) and value > 0, name, value, "a positive float or None")
    clips = [n for n in positive if arguments.get(n) is not None]
    if len(clips) > 1:
        raise ValueError(
            f"Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
            f"Received: {', '.join(f'{n}={arguments[n]}' for n in clips)}"
        )


def validate_fan_in_axes(fan_in_axes):
    """Checks a ``{variable path: tuple of ints or None}`` mapping; returns a copy."""
    if fan_in_axes is None:
        return None
    _require(isinstance(fan_in_axes, dict), "fan_in_axes", fan_in_axes,
             "a dict from variable path to a tuple of axes or None")
    checked = {}
    for path, axes in fan_in_axes.items():
        ok_axes = axes is None or (
            isinstance(axes, (tuple, list)) and all(isinstance(a, int) and a >= 0 for a in axes)
        )
        _require(isinstance(path, str) and ok_axes, "fan_in_axes", fan_in_axes,
                 "a dict from variable path (str) to a tuple of non-negative ints or None")
        checked[path] = None if axes is None else tuple(axes)
    return checked


def validate_centralization(value):
    """Checks the Adam classes' ``centralization`` target."""
    _require(value in CENTRALIZATION_TARGETS, "centralization", value,
             f"one of {CENTRALIZATION_TARGETS}")
    return value
