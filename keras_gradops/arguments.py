"""Argument checks shared by the ops, the gradient chain, the optimizers and the models.

Each check raises a ``ValueError`` (or ``TypeError`` for a wrong kind of
object) that names the argument and shows the value received, when the
object is made, so a bad value never reaches a train step.
"""

import math
import numbers


def is_number(value):
    """``True`` for a real number (NumPy scalars too), ``False`` for bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_positive_number(value):
    """``True`` for a finite real number ``> 0``."""
    return is_number(value) and math.isfinite(value) and value > 0


def require(condition, name, value, requirement):
    """Raises ``ValueError("`name` must be <requirement>. Received: name=value")`` unless ``condition``."""
    if not condition:
        raise ValueError(f"`{name}` must be {requirement}. Received: {name}={value!r}")


def check_positive(value, name):
    """A finite number ``> 0``."""
    require(is_positive_number(value), name, value, "a positive finite number")
    return value


def check_optional_positive(value, name):
    """``None`` or a finite number ``> 0``."""
    require(value is None or is_positive_number(value), name, value, "a positive finite number or None")
    return value


def check_bool(value, name):
    require(isinstance(value, bool), name, value, "a bool")
    return value


def check_positive_int(value, name, allow_none=False):
    if allow_none and value is None:
        return value
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
    require(ok, name, value, "a positive int" + (" or None" if allow_none else ""))
    return int(value)


def check_in_interval(value, name, low, high, closed_high=True):
    """A number in ``[low, high]`` (``[low, high)`` with ``closed_high=False``)."""
    ok = is_number(value) and low <= value and (value <= high if closed_high else value < high)
    require(ok, name, value, f"a number in [{low}, {high}{']' if closed_high else ')'}")
    return value


def check_non_negative(value, name):
    require(is_number(value) and math.isfinite(value) and value >= 0, name, value, "a non-negative finite number")
    return value


def check_choice(value, name, choices):
    require(value in choices, name, value, f"one of {tuple(choices)}")
    return value


def check_fan_in_axes(fan_in_axes):
    """A ``{variable path: tuple of non-negative ints, or None}`` mapping; returns a copy with tuples."""
    if fan_in_axes is None:
        return None
    requirement = "a dict from variable path (str) to a tuple of non-negative ints or None"
    require(isinstance(fan_in_axes, dict), "fan_in_axes", fan_in_axes, requirement)
    checked = {}
    for path, axes in fan_in_axes.items():
        ok_axes = axes is None or (
            isinstance(axes, (tuple, list))
            and all(isinstance(a, numbers.Integral) and not isinstance(a, bool) and a >= 0 for a in axes)
        )
        require(isinstance(path, str) and ok_axes, "fan_in_axes", fan_in_axes, requirement)
        checked[path] = None if axes is None else tuple(int(a) for a in axes)
    return checked
