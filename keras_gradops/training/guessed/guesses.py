"""Per-layer guesses ``y_l`` of ``dL/ds_l``, the gradient at a pre-activation.

Singhal et al., "How to guess a gradient", arXiv 2312.04709, section 3. Every
guess is a function of the forward pass's values (no gradient) and of random
draws; ``J_act(s)^T`` is the pull-back through the layer's activation, for
ReLU the mask ``1[s > 0]``. Every guess takes the same arguments (see
:func:`activation_perturbation`) and returns ``(y, draw)``, the draw being
what a test needs to rebuild ``y``, or a function making it where a step
would otherwise hold it for nothing (the mixing matrix).
"""

import tensorflow as tf

from keras_gradops.training.guessed.noise import draw as draw_noise, fold_in
from keras_gradops.training.guessed.ordering import after as wait_for


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


_MIXING_BLOCK_ELEMENTS = 2**18  # a block of M may take 1 MiB (float32) even when ``s`` is smaller


def _mixing_block_rows(s):
    """Rows of ``M`` drawn at a time: a block no larger than ``s`` (or 2**18 elements), at most the batch."""
    batch = tf.shape(s)[0]
    example = tf.reduce_prod(tf.shape(s)[1:])
    return tf.minimum(batch, tf.maximum(example, (_MIXING_BLOCK_ELEMENTS + batch - 1) // batch))


def _row_blocks(block, count, block_shape, dtype, after):
    """``concat([block(0), ..., block(count - 1)])`` along the first axis, made one block at a time.

    The blocks are written into a ``[count, *block_shape]`` tensor that a
    loop carries; its zeros wait for ``after`` (XLA would compute every
    loop's zeros at the start of the step and hold them all: two layers'
    worth a layer, measured), and the loop runs one iteration at a time
    (TensorFlow's executor would run up to ten, each holding its block).
    """
    (blocks,) = wait_for(after, [tf.zeros(tf.concat([[count], block_shape], 0), dtype)])

    def write(index, blocks):
        return index + 1, tf.tensor_scatter_nd_update(blocks, [[index]], block(index)[None])

    _, blocks = tf.while_loop(lambda index, _: index < count, write, (tf.constant(0), blocks),
                              parallel_iterations=1)
    return tf.reshape(blocks, tf.concat([[-1], block_shape[1:]], 0))


def activation_mixing(site, s, next_site, seed, noise, s_next=None):
    """``y = J_act(s)^T (M act(s))``, ``M_bc ~ N(0, 1/B)`` mixing the batch's own outputs.

    ``M`` is ``B x B``: 256 MiB at batch 8192, more than a layer's
    activations from batch = width on. It is drawn and applied a block of
    rows at a time, ``(M act(s))_rows = M_rows act(s)``, each block from its
    own seed and no larger than ``s`` (or 2**18 elements), so the guess
    holds about one layer's values at any batch. The draw returned is a
    function making the whole ``M`` (for a test; a step never calls it).
    """
    batch = tf.shape(s)[0]
    rows = _mixing_block_rows(s)
    blocks = (batch + rows - 1) // rows  # the last block's rows past the batch are dropped
    a = site.activate(s)
    (seed,) = wait_for([s], [seed])
    scale = tf.math.rsqrt(tf.cast(batch, s.dtype))

    def mixing_rows(index):
        return draw_noise(noise, fold_in(seed, tf.cast(index, tf.int64)), tf.stack([rows, batch]), s.dtype)

    mixed = _row_blocks(lambda index: tf.tensordot(mixing_rows(index), a, axes=[[1], [0]]), blocks,
                        tf.concat([[rows], tf.shape(s)[1:]], 0), s.dtype, after=[s])
    y = site.pull_back(s, mixed[:batch] * scale)
    return y, lambda: _row_blocks(mixing_rows, blocks, tf.stack([rows, batch]), s.dtype, after=[s])[:batch] * scale
