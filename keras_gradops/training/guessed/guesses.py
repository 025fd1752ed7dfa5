"""Per-layer guesses ``y_l`` of ``dL/ds_l``, the gradient at a pre-activation.

Singhal et al., "How to guess a gradient", arXiv 2312.04709, section 3. Every
guess is a function of the forward pass's values (no gradient) and of random
draws; ``J_act(s)^T`` is the pull-back through the layer's activation, for
ReLU the mask ``1[s > 0]``. Every guess takes the same arguments (see
:func:`activation_perturbation`) and returns ``(y, draw)``, the draw being
what a test needs to rebuild ``y``, or a function making it where a step
would otherwise hold it for nothing (the mixing matrix, weight_transpose's
``eps`` before a Dense layer).
"""

import keras
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


def _next_input_and_transpose(site, a):
    """``(x_next, back)``: the next site's input ``site.to_next_input(a)``, made once, and the transpose of
    that map, ``back(v)`` shaped as ``a`` for ``v`` shaped as ``x_next``.

    Flatten/Reshape layers between the sites are transposed exactly; Dropout
    and normalisation layers are the identity in a guess. ``back`` is called
    once (a non-persistent tape).
    """
    if not site.reshapes:
        return a, lambda value: value
    with tf.GradientTape() as tape:
        tape.watch(a)
        x_next = site.to_next_input(a)
    return x_next, lambda value: tape.gradient(x_next, a, output_gradients=value)


def _noise_times_transposed_kernel(s, x_next, next_site, seed, noise):
    """``(eps W^T, eps)`` for a Dense next layer: ``eps ~ noise`` at its pre-activation, ``eps W^T`` shaped as ``x_next``.

    ``eps W^T`` is drawn and multiplied a block of rows at a time
    (:func:`_noise_product`), so the whole ``eps`` (a layer) is never made.
    Made whole, TensorFlow's allocator record of a 16x1024 step (batch 8192,
    no XLA) held ``s``, its tangent, ``eps`` and ``eps W^T`` at once: the
    step's allocator peak went from 212 to 188 MiB (backprop's 636) and the
    process's from 232-261 MiB (3 processes) to 216-246 MiB (8). ``eps`` is
    returned as a function making it (the same blocks times the identity),
    for a test; a step never calls it.
    """
    kernel = keras.ops.cast(next_site.kernel, x_next.dtype)
    inputs, units = kernel.shape
    flat = tf.reshape(x_next, [-1, inputs])
    count = tf.shape(flat)[0]
    rows = _block_rows(flat, units, _TRANSPOSE_BLOCK_ELEMENTS)
    # The kernel goes in untransposed: a transposed copy would be made at the start of the step and held.
    product = _noise_product(seed, kernel, count, rows, noise, s, True)

    def eps():
        return tf.reshape(_noise_product(seed, tf.eye(units, dtype=x_next.dtype), count, rows, noise, s),
                          next_site.pre_activation_shape(x_next))

    return tf.reshape(product, tf.shape(x_next)), eps


def weight_transpose(site, s, next_site, seed, noise, s_next=None):
    """``y = J_act(s)^T (eps K_{l+1}^T)``, ``eps ~ N(0, I)`` at the next layer's pre-activation.

    ``eps K^T`` is ``eps W^T`` for a Dense next layer, the transposed
    convolution for a Conv2D. Without XLA, ``eps W^T`` for a Dense next layer
    is drawn and multiplied a block of rows at a time
    (:func:`_noise_times_transposed_kernel`); XLA's buffers for the 16x1024
    step were the same either way (342 and 344 MiB) and the process peak no
    lower, so under XLA ``eps`` is drawn whole (no loop to compile). The
    last layer (``next_site is None``) falls back to activation
    perturbation.
    """
    if next_site is None:
        return _perturbation(s, seed, noise)
    x_next, back = _next_input_and_transpose(site, s)
    if next_site.is_dense and not compiled_by_xla():
        (seed,) = wait_for([s], [seed])
        eps_kernel_t, eps = _noise_times_transposed_kernel(s, x_next, next_site, seed, noise)
    else:
        eps = _next_layer_noise(x_next, next_site, seed, noise, after=[s])
        eps_kernel_t = next_site.kernel_transpose(eps, x_next)
    return site.pull_back(s, back(eps_kernel_t)), eps


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
    x_next, back = _next_input_and_transpose(site, site.activate(s))
    s_next = next_site.pre_activation(x_next) if s_next is None else tf.stop_gradient(s_next)
    # ``eps`` waits for ``s'``: drawn earlier, it was alive beside ``act(s)`` (one layer more at the peak).
    eps = _next_layer_noise(x_next, next_site, seed, noise, after=[s_next])
    return site.pull_back(s, back(next_site.kernel_transpose(next_site.pull_back(s_next, eps), x_next))), eps


# A block may take this many entries even when an eighth of the product is smaller. Mixing: 1 MiB (float32),
# its draw being B x B. weight_transpose: 4 MiB; with 1 MiB, the 16x1024 step at batch 512 (no XLA) took
# 2.39 Keras steps against 2.00 with eps whole (two blocks of 256 rows a layer), 2.08 with one block.
_MIXING_BLOCK_ELEMENTS = 2**18
_TRANSPOSE_BLOCK_ELEMENTS = 2**20


@shared_function
def _noise_product(seed, right, count, rows, noise, start, transpose_right=False):
    """``N right`` (``N right^T`` with ``transpose_right``) for ``N ~ noise``, ``count`` rows, drawn and
    applied a block of rows at a time.

    ``(N right)_rows = N_rows right``: block ``i`` is rows ``[i r, (i + 1) r)``
    of ``N``, ``r = rows``, drawn from ``sequence_seed(seed, i)`` (the rows
    past ``count`` in the last block are dropped), so no more than a block of
    ``N`` is ever alive: activation_mixing's ``M`` (``B x B``) and
    weight_transpose's ``eps`` (a layer) are drawn this way. The products are
    written, by row, into a tensor of zeros made after ``start`` (mixing made
    it after the seed, with an earlier block layout, and XLA's process peak
    at 16x1024 was 0.46 of backprop's, not 0.44); the caller makes the seed
    wait for the layer (else every layer's tensor (XLA) or first block
    (TensorFlow's executor) is made at the start of the step and held:
    measured); the loop runs one block at a time (TensorFlow's executor
    would run ten, each holding its block). Under XLA the write is a scatter
    of the block's row indices: a tensor of blocks updated by one block index
    compiles to a dynamic-update-slice fusion, which XLA on CPU builds with
    its MLIR fusion emitter, and at 16x1024 the process's peak with mixing
    (the compiler's) was 0.44 of backprop's against 0.38 (measured, 3
    processes each; the compiled step's buffers are the same). A shared
    function (:mod:`~keras_gradops.training.guessed.shared_function`): a call
    is one op of the step's program, not the loop's hundred, and the runtime
    it is traced for picks its in-place write. ``rows`` is a Python int when
    the shapes are known as the step is traced (a constant tensor would give
    each call its own copy of the function, see :func:`_block_rows`).
    """
    (zero,) = wait_for([start], [tf.zeros([], right.dtype)])
    inner, width = tf.shape(right)[1 if transpose_right else 0], tf.shape(right)[0 if transpose_right else 1]
    blocks = (count + rows - 1) // rows

    def multiply_rows(index, product):
        block = draw_noise(noise, sequence_seed(seed, index), tf.stack([rows, inner]), right.dtype)
        block = tf.matmul(block, right, transpose_b=transpose_right)
        if compiled_by_xla():  # XLA updates in place; its strided-slice update needs a constant start
            return index + 1, tf.tensor_scatter_nd_update(product, (index * rows + tf.range(rows))[:, None], block)
        # TensorFlow's executor copied ``product`` for a scatter (two alive: measured); this writes in place.
        begin, end = tf.stack([index * rows, 0]), tf.stack([(index + 1) * rows, width])
        return index + 1, tf.raw_ops.TensorStridedSliceUpdate(input=product, begin=begin, end=end, strides=[1, 1],
                                                              value=block)

    product = tf.fill(tf.stack([blocks * rows, width]), zero)
    _, product = tf.while_loop(lambda index, _: index < blocks, multiply_rows, (tf.constant(0), product),
                               parallel_iterations=1)
    return product[:count]


def activation_mixing(site, s, next_site, seed, noise, s_next=None):
    """``y = J_act(s)^T (M act(s))``, ``M_bc ~ N(0, 1/B)`` mixing the batch's own outputs.

    ``M`` is ``B x B``: 256 MiB at batch 8192, more than a layer's
    activations from batch = width on. :func:`_noise_product` draws and
    applies it a block of rows at a time, each an eighth of ``s`` (or
    ``2**18`` entries if that is more), so the guess holds the layer's
    activation and product and one small block at any batch. Measured: a
    block as large as ``s`` cost XLA's step 1.1 more layers of buffers at
    width 1024, batch 8192; a fixed ``2**20`` entries cost four layers at
    width 128, batch 2048. The draw returned is a function making the whole
    ``M`` (as ``M I``; for a test, a step never calls it).
    """
    (seed,) = wait_for([s], [seed])

    def mix(a):
        return _mixed(seed, a, s, noise, _MIXING_BLOCK_ELEMENTS)

    return site.pull_back(s, mix(site.activate(s))), lambda: mix(tf.eye(tf.shape(s)[0], dtype=s.dtype))


@shared_function
def _mixed(seed, a, s, noise, smallest):
    """``M a``, ``M_bc ~ noise / sqrt(B)`` for ``B`` the batch (``a``'s first axis): :func:`_noise_product`
    in blocks of rows sized by the guess's pre-activation ``s`` (:func:`_block_rows`).

    A shared function: per call it traced about thirty ops into the step
    (shapes and block size), once per layer and pass.
    """
    batch = tf.shape(a)[0]
    flat = tf.reshape(a, [batch, -1])
    product = _noise_product(seed, flat, batch, _block_rows(s, s.shape[0], smallest), noise, flat)
    return tf.reshape(product, tf.shape(a)) * tf.math.rsqrt(tf.cast(batch, a.dtype))


def _block_rows(product, inner, smallest):
    """Rows of a block of ``N`` (:func:`_noise_product`): a block of ``N`` (``inner`` columns) and of the
    product is at most an eighth of ``product`` (or ``smallest`` entries if that is more), at most all its rows.

    ``product`` is shaped as the product (its rows on the first axis). Both
    sides count: weight_transpose's last guess before a 10-unit layer drew
    ``eps`` in one block (an eighth of the product is 1M entries, 100K rows
    of 10) and that block's product was a whole layer. A Python int when the
    shapes are known as the step is traced, else an int32 tensor (``fit``
    traces with an unknown batch, under XLA too, which then sees the shape
    only as it compiles): a constant tensor input to :func:`_noise_product`
    would get Grappler to specialize a copy of the function for each call.
    ``inner`` is an int or ``None`` (the batch, unknown as the step is
    traced: then ``product``'s rows).
    """
    count, size = product.shape[0], product.shape.num_elements()
    maximum, minimum = max, min
    if size is None or inner is None:
        count, size = tf.shape(product)[0], tf.size(product)
        maximum, minimum = tf.maximum, tf.minimum
        inner = count if inner is None else inner
    columns = maximum(inner, size // count)
    block = maximum(size // 8, smallest)
    return minimum(count, (block + columns - 1) // columns)
