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

from keras_gradops.keras_internals import compiled_by_xla
from keras_gradops.training.guessed.noise import draw as draw_noise, sequence_seed
from keras_gradops.training.guessed.ordering import after as wait_for
from keras_gradops.training.guessed.shared_function import shared_function


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
    s_next = next_site.pre_activation(x_next) if s_next is None else tf.stop_gradient(s_next)
    # ``eps`` waits for ``s'``: drawn earlier, it was alive beside ``act(s)`` (one layer more at the peak).
    eps = _next_layer_noise(x_next, next_site, seed, noise, after=[s_next])
    return site.pull_back(s, _transpose_to(site, a, next_site, next_site.pull_back(s_next, eps))), eps


_MIXING_BLOCK_ELEMENTS = 2**18  # a block of M may take 1 MiB (float32) even when an eighth of ``s`` is smaller


@shared_function
def _mix(seed, a, rows, noise):
    """``M a`` for the unscaled ``M ~ noise``, ``B x B``, drawn and applied a block of rows at a time.

    ``(M a)_rows = M_rows a``: block ``i`` is rows ``[i r, (i + 1) r)`` of
    ``M``, ``r = rows``, drawn from ``sequence_seed(seed, i)`` (the rows past the batch in
    the last block are dropped). The products are written, by row, into a
    tensor of zeros made after ``a`` (made after the seed, with the earlier
    block layout, XLA's process peak at 16x1024 was 0.46 of backprop's, not
    0.44); the caller makes the seed wait for the layer (else every layer's
    tensor (XLA) or first block (TensorFlow's executor) is made at the start
    of the step and held: measured); the loop runs one block at a time
    (TensorFlow's executor would run ten, each holding its block). Under XLA the write is a scatter of the
    block's row indices: a tensor of blocks updated by one block index
    compiles to a dynamic-update-slice fusion, which XLA on CPU builds with
    its MLIR fusion emitter, and at 16x1024 the process's peak (the
    compiler's) was 0.44 of backprop's against 0.38 (measured, 3 processes
    each; the compiled step's buffers are the same). A shared function
    (:mod:`~keras_gradops.training.guessed.shared_function`): a call is one
    op of the step's program, not the loop's hundred, and the runtime it is
    traced for picks its in-place write. ``rows`` is a Python int when the
    batch is known as the step is traced (a constant tensor would give each
    call its own copy of the function, see :func:`_block_rows`).
    """
    (zero,) = wait_for([a], [tf.zeros([], a.dtype)])
    batch = tf.shape(a)[0]
    flat = tf.reshape(a, [batch, -1])
    width = tf.shape(flat)[1]
    blocks = (batch + rows - 1) // rows

    def mix_rows(index, mixed):
        block = draw_noise(noise, sequence_seed(seed, index), tf.stack([rows, batch]), a.dtype)
        product = tf.matmul(block, flat)
        if compiled_by_xla():  # XLA updates in place; its strided-slice update needs a constant start
            return index + 1, tf.tensor_scatter_nd_update(mixed, (index * rows + tf.range(rows))[:, None], product)
        # TensorFlow's executor copied ``mixed`` for a scatter (two alive: measured); this writes in place.
        start, end = tf.stack([index * rows, 0]), tf.stack([(index + 1) * rows, width])
        return index + 1, tf.raw_ops.TensorStridedSliceUpdate(input=mixed, begin=start, end=end, strides=[1, 1],
                                                              value=product)

    mixed = tf.fill(tf.stack([blocks * rows, width]), zero)
    _, mixed = tf.while_loop(lambda index, _: index < blocks, mix_rows, (tf.constant(0), mixed),
                             parallel_iterations=1)
    return tf.reshape(mixed[:batch], tf.shape(a))


def activation_mixing(site, s, next_site, seed, noise, s_next=None):
    """``y = J_act(s)^T (M act(s))``, ``M_bc ~ N(0, 1/B)`` mixing the batch's own outputs.

    ``M`` is ``B x B``: 256 MiB at batch 8192, more than a layer's
    activations from batch = width on. :func:`_mix` draws and applies it a
    block of rows at a time, each an eighth of ``s`` (or ``2**18`` entries
    if that is more), so the guess holds the layer's activation and product
    and one small block at any batch. Measured: a block as large as ``s``
    cost XLA's step 1.1 more layers of buffers at width 1024, batch 8192; a
    fixed ``2**20`` entries cost four layers at width 128, batch 2048. The
    draw returned is a function making the whole ``M`` (as ``M I``; for a
    test, a step never calls it).
    """
    batch = tf.shape(s)[0]
    rows = _block_rows(s)
    (seed,) = wait_for([s], [seed])
    scale = tf.math.rsqrt(tf.cast(batch, s.dtype))
    y = site.pull_back(s, _mix(seed, site.activate(s), rows, noise) * scale)
    return y, lambda: _mix(seed, tf.eye(batch, dtype=s.dtype), rows, noise) * scale


def _block_rows(s):
    """Rows of ``M`` a block: an eighth of ``s`` (at least ``2**18`` entries) over the batch, at most the batch.

    A Python int when ``s``'s shape is known as the step is traced, else an
    int32 tensor (``fit`` traces with an unknown batch, under XLA too, which
    then sees the shape only as it compiles): a constant tensor input to
    :func:`_mix` would get Grappler to specialize a copy of the function for
    each call.
    """
    batch, size = s.shape[0], s.shape.num_elements()
    maximum, minimum = max, min
    if size is None:
        batch, size = tf.shape(s)[0], tf.size(s)
        maximum, minimum = tf.maximum, tf.minimum
    block = maximum(size // 8, _MIXING_BLOCK_ELEMENTS)
    return minimum(batch, (block + batch - 1) // batch)
