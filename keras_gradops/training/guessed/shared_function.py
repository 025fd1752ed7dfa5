"""Functions a guessed step calls at every layer: without XLA, one instance that every call runs.

A draw of random signs (:func:`~keras_gradops.training.guessed.noise.draw`),
a block-wise mixing (:func:`~keras_gradops.training.guessed.guesses.activation_mixing`)
or the zero that orders a step under XLA (:mod:`~keras_gradops.training.guessed.ordering`)
is a few dozen ops, and a step calls one or more per layer. Traced as a nested
``tf.function`` it is one call op in the step's graph, but TensorFlow's
runtime inlines every call before it optimizes and instantiates the graph,
so the ops were repeated once per call, and the process keeps memory in
proportion to the graph it runs (measured, TF 2.21 on CPU: about 6 KiB an
op; the sign draws were 1768 of the 2466 ops of a 16-layer
activation_perturbation step, 25 MiB of its peak at width 1024, batch 8192).
Marked ``_noinline`` (an attribute ``tf.function`` accepts in
``experimental_attributes``), the function is instantiated once and every
call runs that instance.

Under XLA the whole step is one compiled program: the calls stay inlined,
as before, so XLA fuses and schedules across them and the optimized program
is the same; what is saved is the traced graph, which XLA's bridge lowers
with every op's Python stack trace (heaptrack: 38 MiB of stack traces for
the 2729 ops of a 16-layer weight_transpose step, 27 MiB for 1981).
A value XLA must know as it compiles (a shape) must not come out of such a
call: XLA then bounds it instead (activation_mixing's block rows, bounded by
the batch, drew the whole ``B x B`` matrix). Each runtime has its own
``tf.function``, so a trace made for one is never reused by the other, and
:func:`~keras_gradops.keras_internals.compiled_by_xla` inside the function
tells which runtime it is traced for.
"""

import functools

import tensorflow as tf

from keras_gradops.keras_internals import compiled_by_xla

_NO_INLINE = "_noinline"


def shared_function(python_function):
    """``python_function`` as a ``tf.function`` (no autograph) that runs as one shared instance without XLA.

    Returns a function with ``python_function``'s arguments: under XLA it
    calls the inlined ``tf.function``, otherwise the ``_noinline`` one.
    """
    inlined = tf.function(python_function, autograph=False)
    shared = tf.function(python_function, autograph=False, experimental_attributes={_NO_INLINE: True})

    @functools.wraps(python_function)
    def call(*args):
        return (inlined if compiled_by_xla() else shared)(*args)

    return call
