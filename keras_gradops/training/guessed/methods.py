"""The gradient-guessing methods and the checks of their arguments.

Singhal et al., "How to guess a gradient", arXiv 2312.04709: a guess ``y_l``
of ``dL/ds_l`` at each layer's pre-activation ``s_l``, scored by one
forward-mode directional derivative, replaces backpropagation.
"""

import dataclasses
from typing import Callable, Optional

import tensorflow as tf

from keras_gradops.training.guessed import guesses
from keras_gradops.training.guessed.noise import DEFAULT, DISTRIBUTIONS, NORMAL


@dataclasses.dataclass(frozen=True)
class GuessingMethod:
    """One way to estimate the gradient without a backward pass.

    Attributes:
        name: what users pass as ``method=``.
        layer_guess: for an activation-space method, the function of
            :mod:`~keras_gradops.training.guessed.guesses` giving each layer's
            guess ``y_l`` of ``dL/ds_l``; ``None`` for the others.
        perturbs_weights: the tangent is a random direction of the weights
            themselves (directional descent): no per-layer guess.
        exact: the true gradient (backprop, the oracle): no draw at all.
        zeroth_order: the guess is a finite difference of the loss along a
            random direction of the weights, from two forward passes with
            the weights perturbed in place (SPSA, as MeZO): no derivative.
        uses_next_layer: the guess of a layer is pulled back through the next
            Dense/Conv2D kernel, so only reshapes may stand between sites.
        shares_next_pre_activation: the guess needs the next site's
            pre-activation, which that site can then reuse.
    """

    name: str
    layer_guess: Optional[Callable] = None
    perturbs_weights: bool = False
    exact: bool = False
    zeroth_order: bool = False
    uses_next_layer: bool = False
    shares_next_pre_activation: bool = False

    @property
    def guesses_activations(self):
        """Whether the method puts a per-example guess at every layer's pre-activation."""
        return self.layer_guess is not None

    def guess(self, site, s, next_site, seed, noise, s_next=None):
        """``(y, draw)``: this method's guess for ``site`` at pre-activation ``s``; no gradient flows into it."""
        y, draw = self.layer_guess(site, tf.stop_gradient(s), next_site, seed, noise, s_next)
        return tf.stop_gradient(y), draw

    def __str__(self):
        return self.name


DIRECTIONAL_DESCENT = GuessingMethod("directional_descent", perturbs_weights=True)
ACTIVATION_PERTURBATION = GuessingMethod("activation_perturbation", guesses.activation_perturbation)
WEIGHT_TRANSPOSE = GuessingMethod("weight_transpose", guesses.weight_transpose, uses_next_layer=True)
ACTIVATION_MIXING = GuessingMethod("activation_mixing", guesses.activation_mixing)
ONE_LAYER_DOWNSTREAM = GuessingMethod("one_layer_downstream", guesses.one_layer_downstream, uses_next_layer=True,
                                      shares_next_pre_activation=True)
SPSA = GuessingMethod("spsa", zeroth_order=True)
BACKPROP = GuessingMethod("backprop", exact=True)

ALL_METHODS = (
    DIRECTIONAL_DESCENT, ACTIVATION_PERTURBATION, WEIGHT_TRANSPOSE, ACTIVATION_MIXING, ONE_LAYER_DOWNSTREAM, SPSA,
    BACKPROP,
)
METHODS = tuple(method.name for method in ALL_METHODS)
"""The names ``method=`` accepts."""

ACTIVATION_SPACE_METHODS = tuple(method.name for method in ALL_METHODS if method.guesses_activations)
"""The names of the methods that put a per-example guess at each layer's pre-activation."""


def get(method):
    """The :class:`GuessingMethod` named ``method`` (a name or a method), else ``ValueError``."""
    if isinstance(method, GuessingMethod):
        return method
    for candidate in ALL_METHODS:
        if method == candidate.name:
            return candidate
    raise ValueError(f"`method` must be one of {METHODS}. Received: method={method!r}")


def validate_num_guesses(num_guesses, method):
    """Returns ``num_guesses`` if it is an int >= 1 (1 for the exact gradient); ``method`` a :class:`GuessingMethod`."""
    if isinstance(num_guesses, bool) or not isinstance(num_guesses, int) or num_guesses < 1:
        raise ValueError(f"`num_guesses` must be an int >= 1. Received: num_guesses={num_guesses!r}")
    if method.exact and num_guesses != 1:
        raise ValueError(
            "method='backprop' computes the exact gradient; averaging guesses does not apply. "
            f"Use num_guesses=1. Received: num_guesses={num_guesses}"
        )
    return num_guesses


def validate_recompute(recompute, method):
    """Returns ``recompute`` if it is ``"auto"`` or a bool that ``method`` can use."""
    if not (isinstance(recompute, bool) or (isinstance(recompute, str) and recompute == "auto")):
        raise ValueError(f"`recompute` must be a bool or 'auto'. Received: recompute={recompute!r}")
    if recompute is True and not method.guesses_activations:
        raise ValueError(
            f"`recompute=True` re-runs the forward pass to rebuild per-layer guesses; method={method.name!r} "
            f"keeps none (it needs no recomputation). Use it with one of {ACTIVATION_SPACE_METHODS}."
        )
    return recompute


DEFAULT_PERTURBATION_SCALE = 1e-3
"""``spsa``'s default ``perturbation_scale``, MeZO's ``eps``."""


def validate_perturbation_scale(perturbation_scale, method):
    """``spsa``'s step ``eps``: ``perturbation_scale`` (a float > 0), or the default for ``None``.

    Raises:
        ValueError: a value that is not a positive finite number, or one given
            to a method that perturbs no weights in place.
    """
    if perturbation_scale is None:
        return DEFAULT_PERTURBATION_SCALE if method.zeroth_order else None
    if not method.zeroth_order:
        raise ValueError(
            f"`perturbation_scale` is the step of method='spsa'; method={method.name!r} does not use it. "
            f"Received: perturbation_scale={perturbation_scale!r}"
        )
    if (isinstance(perturbation_scale, bool) or not isinstance(perturbation_scale, (int, float))
            or not 0 < perturbation_scale < float("inf")):
        raise ValueError(
            f"`perturbation_scale` must be a finite number > 0 (MeZO uses 1e-3). "
            f"Received: perturbation_scale={perturbation_scale!r}"
        )
    return float(perturbation_scale)


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
    if method.exact and noise != NORMAL:
        raise ValueError(
            f"method='backprop' computes the exact gradient and draws no noise. Received: noise={noise!r}"
        )
    return noise
