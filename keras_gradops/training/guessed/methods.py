"""The gradient-guessing methods and the checks of their arguments.

Singhal et al., "How to guess a gradient", arXiv 2312.04709: a guess ``y_l``
of ``dL/ds_l`` at each layer's pre-activation ``s_l``, scored by one
forward-mode directional derivative, replaces backpropagation.
"""

from keras_gradops.training.guessed.noise import DEFAULT, DISTRIBUTIONS, NORMAL

DIRECTIONAL_DESCENT = "directional_descent"
ACTIVATION_PERTURBATION = "activation_perturbation"
WEIGHT_TRANSPOSE = "weight_transpose"
ACTIVATION_MIXING = "activation_mixing"
ONE_LAYER_DOWNSTREAM = "one_layer_downstream"
BACKPROP = "backprop"

METHODS = (
    DIRECTIONAL_DESCENT,
    ACTIVATION_PERTURBATION,
    WEIGHT_TRANSPOSE,
    ACTIVATION_MIXING,
    ONE_LAYER_DOWNSTREAM,
    BACKPROP,
)

# Methods that put a per-example guess at each layer's pre-activation.
ACTIVATION_SPACE_METHODS = (
    ACTIVATION_PERTURBATION,
    WEIGHT_TRANSPOSE,
    ACTIVATION_MIXING,
    ONE_LAYER_DOWNSTREAM,
)

# Methods whose guess for a layer is pulled back through the next Dense or Conv2D kernel.
NEXT_LAYER_METHODS = (WEIGHT_TRANSPOSE, ONE_LAYER_DOWNSTREAM)


def validate_method(method):
    """Returns ``method`` if it is one of :data:`METHODS`, else raises ``ValueError``."""
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}. Received: method={method!r}")
    return method


def validate_num_guesses(num_guesses, method):
    """Returns ``num_guesses`` if it is an int >= 1 (1 for ``"backprop"``)."""
    if isinstance(num_guesses, bool) or not isinstance(num_guesses, int) or num_guesses < 1:
        raise ValueError(f"`num_guesses` must be an int >= 1. Received: num_guesses={num_guesses!r}")
    if method == BACKPROP and num_guesses != 1:
        raise ValueError(
            "method='backprop' computes the exact gradient; averaging guesses does not apply. "
            f"Use num_guesses=1. Received: num_guesses={num_guesses}"
        )
    return num_guesses


def validate_recompute(recompute, method):
    """Returns ``recompute`` if it is ``"auto"`` or a bool that ``method`` can use."""
    if not (isinstance(recompute, bool) or (isinstance(recompute, str) and recompute == "auto")):
        raise ValueError(f"`recompute` must be a bool or 'auto'. Received: recompute={recompute!r}")
    if recompute is True and method not in ACTIVATION_SPACE_METHODS:
        raise ValueError(
            f"`recompute=True` re-runs the forward pass to rebuild per-layer guesses; method={method!r} "
            f"keeps none (it needs no recomputation). Use it with one of {ACTIVATION_SPACE_METHODS}."
        )
    return recompute


def validate_noise(noise, method):
    """Returns the distribution ``method`` draws from: ``noise``, or the default for ``None``.

    Raises:
        ValueError: ``noise`` is not one of the distributions, or not ``None``
            or ``"normal"`` for ``"backprop"`` (which draws nothing).
    """
    if noise is None:
        return DEFAULT
    if noise not in DISTRIBUTIONS:
        raise ValueError(f"`noise` must be one of {DISTRIBUTIONS}. Received: noise={noise!r}")
    if method == BACKPROP and noise != NORMAL:
        raise ValueError(
            f"method='backprop' computes the exact gradient and draws no noise. Received: noise={noise!r}"
        )
    return noise
