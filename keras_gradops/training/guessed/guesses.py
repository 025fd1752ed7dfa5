"""Per-layer guesses ``y_l`` of ``dL/ds_l``, the gradient at a pre-activation.

Singhal et al., "How to guess a gradient", arXiv 2312.04709, section 3. Every
guess is a function of the forward pass's values (no gradient) and of random
draws; ``J_act(s)^T`` is the pull-back through the layer's activation, for
ReLU the mask ``1[s > 0]``. Every guess takes the same arguments (see
:func:`activation_perturbation`) and returns ``(y, draw)``, the draw being
what a test needs to rebuild ``y``.
"""

import tensorflow as tf

from keras_gradops.training.guessed.noise import draw as draw_noise


def _perturbation(s, seed, noise):
    y = draw_noise(noise, seed, tf.shape(s), s.dtype, after=[s])
    return y, y


def activation_perturbation(site, s, next_site, seed, noise, s_next=None):
    """``y ~ N(0, I)`` shaped as ``s``: unbiased, ``E[<g, y> y] = g``.

    Args (shared by every guess):
        site: the :class:`~keras_gradops.training.guessed.stack.Site`.
        s: its pre-activation (no gradient flows through it).
        next_site: the next site, or ``None`` for the last.
        seed: the ``[2]`` seed of this site's draws.
        noise: the distribution of the draws, ``"normal"`` or ``"rademacher"``.
        s_next: the next site's pre-activation if the caller has it (only
            :func:`one_layer_downstream` uses it).
    """
    return _perturbation(s, seed, noise)


def _next_layer_noise(x_next, next_site, seed, noise, after):
    shape = next_site.pre_activation_shape(x_next)
    return draw_noise(noise, seed, shape, x_next.dtype, after=after)


def _transpose_to(site, a, next_site, cotangent):
    """``cotangent K_{l+1}^T`` shaped as ``a``: the transpose of ``a -> site.to_next_input(a) K_{l+1}``.

    Only the shape of ``a`` matters (the map is linear); between the sites,
    Flatten/Reshape layers are transposed exactly, Dropout and normalisation
    layers are the identity.
    """
    if not site.reshapes:
        return next_site.kernel_transpose(cotangent, a)
    with tf.GradientTape() as tape:
        tape.watch(a)
        x_next = site.to_next_input(a)
    return tape.gradient(x_next, a, output_gradients=next_site.kernel_transpose(cotangent, x_next))


def weight_transpose(site, s, next_site, seed, noise, s_next=None):
    """``y = J_act(s)^T (eps K_{l+1}^T)``, ``eps ~ N(0, I)`` at the next layer's pre-activation.

    ``eps K^T`` is ``eps W^T`` for a Dense next layer, the transposed
    convolution for a Conv2D. The last layer (``next_site is None``) falls
    back to activation perturbation.
    """
    if next_site is None:
        return _perturbation(s, seed, noise)
    eps = _next_layer_noise(site.to_next_input(s), next_site, seed, noise, after=[s])
    return site.pull_back(s, _transpose_to(site, s, next_site, eps)), eps


def one_layer_downstream(site, s, next_site, seed, noise, s_next=None):
    """``y = J_act(s)^T ((J_act'(s')^T eps) K_{l+1}^T)``: ``eps`` at the next layer's output.

    ``s' = act(s) K_{l+1} + b_{l+1}`` is the next layer's pre-activation
    (after the Flatten/Reshape layers between), so ``eps`` is pulled back
    through that layer's true Jacobian (both activations and ``K_{l+1}``,
    transposed as in :func:`weight_transpose`); a caller that has ``s'``
    passes it as ``s_next``. The last layer falls back to activation
    perturbation.
    """
    if next_site is None:
        return _perturbation(s, seed, noise)
    a = site.activate(s)
    x_next = site.to_next_input(a)
    eps = _next_layer_noise(x_next, next_site, seed, noise, after=[s])
    s_next = next_site.pre_activation(x_next) if s_next is None else tf.stop_gradient(s_next)
    return site.pull_back(s, _transpose_to(site, a, next_site, next_site.pull_back(s_next, eps))), eps


def activation_mixing(site, s, next_site, seed, noise, s_next=None):
    """``y = J_act(s)^T (M act(s))``, ``M_bc ~ N(0, 1/B)`` mixing the batch's own outputs."""
    batch = tf.shape(s)[0]
    mixing = draw_noise(noise, seed, tf.stack([batch, batch]), s.dtype, after=[s])
    mixing = mixing / tf.sqrt(tf.cast(batch, s.dtype))
    mixed = tf.tensordot(mixing, site.activate(s), axes=[[1], [0]])
    return site.pull_back(s, mixed), mixing
