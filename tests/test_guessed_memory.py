"""A guessed training step's memory does not grow with depth, under XLA and without it.

Small ReLU MLPs (width 128, batch 2048: one layer's activations are 1 MiB,
its weights 1/16 of that) at depth 4 and 12, default options, plain
``keras.Model`` backprop as the reference that must grow (so neither measure
is blind to activations):

- without XLA, TensorFlow's BFC allocator counts every tensor of the step:
  its peak over one ``train_step``, in a fresh process (the allocator is
  chosen when TensorFlow starts);
- under XLA the allocator does not see XLA's buffers: the compiled
  program's buffer assignment lists every buffer it allocates
  (``experimental_get_compiler_ir(...)(stage="optimized_hlo_proto_serialized")``,
  an ``HloProto``), whose sizes add up to the program's memory.

Eight more layers add eight layers of activations or more to backprop
(9.8 MiB to the allocator's peak, 16 MiB to XLA's buffers here); to a
guessed step only their gradients (0.5 MiB) and what the allocator's
scheduling noise adds: the bound is 2 MiB. (From depth 2, the shallowest
stack leaves the executor less to overlap: one_layer_downstream's peak
went from 5.2-6.1 layers at depth 2 to 6.5-7.0 at depth 8 and 14, a step
up, not a growth, which a 2-to-8 comparison once read as 2.5 layers.)
Every activation-space method, without XLA and under it (a compile of
about 3 s per program).

Beside the tensors, the process keeps memory in proportion to the graph
TensorFlow's runtime optimizes and instantiates (no XLA): that graph may
grow with depth by a few backprop layers' worth of nodes a layer, counted
in the run metadata of the step's first call. Under XLA the same holds for
the traced step that XLA's bridge lowers.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_gradops import GuessedGradientModel

WIDTH, BATCH, SHALLOW, DEEP = 128, 2048, 4, 12
LAYER = WIDTH * BATCH * 4  # bytes of one layer's activations
METHODS = ["activation_perturbation", "weight_transpose", "one_layer_downstream", "activation_mixing"]
BOUND = 2 * LAYER

_PROBE = r"""
import json, os, sys
os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, sys.argv[1])
import keras, tensorflow as tf
from test_guessed_memory import BATCH, WIDTH, compiled_step
peaks = {}
for method in ["keras"] + json.loads(sys.argv[2]):
    for depth in json.loads(sys.argv[3]):
        step, x, y = compiled_step(method, depth, jit_compile=False)
        step(x, y)
        runs = []
        for _ in range(3):
            tf.config.experimental.reset_memory_stats("CPU:0")
            before = tf.config.experimental.get_memory_info("CPU:0")["current"]
            step(x, y)
            runs.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - before)
        peaks[f"{method}/{depth}"] = min(runs)
print(json.dumps(peaks))
"""


def mlp(depth):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((WIDTH,)), *[keras.layers.Dense(WIDTH, activation="relu") for _ in range(depth)],
                             keras.layers.Dense(10)])


def compiled_step(method, depth, jit_compile):
    """A traced ``train_step`` of ``method`` ("keras": plain backprop) with default options, and a batch."""
    net = mlp(depth)
    model = net if method == "keras" else GuessedGradientModel(net, method=method, seed=0)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(BATCH, WIDTH)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, BATCH))
    return tf.function(lambda x, y: model.train_step((x, y)), jit_compile=jit_compile), x, y


def compiled_program(step, x, y, stage):
    """The program XLA compiles for ``step(x, y)`` at ``stage`` (of ``experimental_get_compiler_ir``)."""
    tf.function(lambda: step(x, y)).get_concrete_function()  # traced under XLA's context, as fit traces it
    return step.experimental_get_compiler_ir(x, y)(stage=stage)


def xla_buffer_bytes(step, x, y):
    """Total size of the buffers XLA assigns the compiled step (parameters excluded)."""
    try:
        from tensorflow.compiler.xla.service import hlo_pb2
    except ImportError as error:  # the test reads XLA's own proto; TensorFlow 2.21 ships it here
        pytest.fail(f"tensorflow.compiler.xla.service.hlo_pb2 moved in TensorFlow {tf.__version__}: {error}")
    proto = hlo_pb2.HloProto.FromString(compiled_program(step, x, y, "optimized_hlo_proto_serialized"))
    assert proto.HasField("buffer_assignment")
    return sum(a.size for a in proto.buffer_assignment.buffer_allocations
               if not (a.is_entry_computation_parameter or a.is_constant or a.is_thread_local))


def runtime_graph(method, depth):
    """The graph TensorFlow's runtime optimizes and instantiates for one step (no XLA): ``(nodes, functions)``.

    The step's partition graph, from the run metadata of its first call:
    its number of nodes (nested functions inlined) and the number of
    distinct functions its call nodes run (a function Grappler specializes
    per call site is a new one at each call).
    """
    try:
        from tensorflow.python.eager import context
    except ImportError as error:  # TensorFlow 2.21 keeps the eager context here
        pytest.fail(f"tensorflow.python.eager.context moved in TensorFlow {tf.__version__}: {error}")
    step, x, y = compiled_step(method, depth, jit_compile=False)
    eager = context.context()
    eager.enable_run_metadata()
    try:
        step(x, y)
        metadata = eager.export_run_metadata()
    finally:
        eager.disable_run_metadata()
    graph = max((graph for function in metadata.function_graphs for graph in function.partition_graphs),
                key=lambda graph: len(graph.node))
    return len(graph.node), len({node.attr["f"].func.name for node in graph.node if "f" in node.attr})


@pytest.fixture(scope="module")
def allocator_peaks():
    """Allocator peaks of one step of keras and each method at both depths, from one fresh process."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", _PROBE, here, json.dumps(METHODS), json.dumps([SHALLOW, DEEP])],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_backprop_memory_grows_in_both_measures(allocator_peaks):
    # Half of the eight layers' activations backprop must keep: the executor may free some early when the
    # machine is busy (seen once under load), and half is still well above the guessed steps' bound.
    growth = allocator_peaks[f"keras/{DEEP}"] - allocator_peaks[f"keras/{SHALLOW}"]
    assert growth > (DEEP - SHALLOW) * LAYER / 2 > BOUND, growth / LAYER
    xla_growth = xla_buffer_bytes(*compiled_step("keras", DEEP, True)) - xla_buffer_bytes(
        *compiled_step("keras", SHALLOW, True))
    assert xla_growth > (DEEP - SHALLOW) * LAYER, xla_growth / LAYER


@pytest.mark.parametrize("method", METHODS)
def test_guessed_step_memory_does_not_grow_with_depth_without_xla(allocator_peaks, method):
    growth = allocator_peaks[f"{method}/{DEEP}"] - allocator_peaks[f"{method}/{SHALLOW}"]
    assert growth <= BOUND, f"{growth / LAYER:.2f} layers"


@pytest.mark.parametrize("method", METHODS)
def test_guessed_step_memory_does_not_grow_with_depth_under_xla(method):
    growth = xla_buffer_bytes(*compiled_step(method, DEEP, True)) - xla_buffer_bytes(
        *compiled_step(method, SHALLOW, True))
    assert growth <= BOUND, f"{growth / LAYER:.2f} layers"


@pytest.fixture(scope="module")
def backprop_graph_growth():
    return runtime_graph("keras", DEEP)[0] - runtime_graph("keras", SHALLOW)[0]


@pytest.mark.parametrize("method", METHODS)
def test_guessed_step_runtime_graph_grows_like_a_few_backprop_layers(backprop_graph_growth, method):
    """The process keeps memory in proportion to the graph its runtime runs (~6 KiB an op, TF 2.21).

    A guessed layer runs its forward pass twice (first pass, then the
    update's), a tangent, a guess and an update: a few times a backprop
    layer's ops. A random draw or block-wise mixing inlined at each call
    site made it 8 to 20 times (120 to 313 nodes a layer against
    backprop's 15); a function Grappler specialized per call site (for a
    constant input) added a function instance a call.
    """
    (deep_nodes, deep_functions), (shallow_nodes, shallow_functions) = (runtime_graph(method, DEEP),
                                                                        runtime_graph(method, SHALLOW))
    growth = deep_nodes - shallow_nodes
    assert backprop_graph_growth >= DEEP - SHALLOW
    assert growth <= 5 * backprop_graph_growth, (growth / (DEEP - SHALLOW), backprop_graph_growth / (DEEP - SHALLOW))
    assert deep_functions == shallow_functions


def traced_ops(method, depth):
    """Ops of the step as ``fit`` traces it for XLA (unknown batch), each nested function's counted once."""
    step, x, y = compiled_step(method, depth, jit_compile=True)
    signature = [tf.TensorSpec([None, WIDTH], x.dtype), tf.TensorSpec([None], y.dtype)]
    graphs, seen, ops = [tf.function(step, input_signature=signature).get_concrete_function().graph], set(), 0
    while graphs:
        graph = graphs.pop()
        ops += len(graph.get_operations())
        for name, function in graph._functions.items():  # the library a traced graph carries (TF 2.21)
            if name not in seen:
                seen.add(name)
                graphs.append(function.graph)
    return ops


@pytest.fixture(scope="module")
def backprop_traced_growth():
    return traced_ops("keras", DEEP) - traced_ops("keras", SHALLOW)


@pytest.mark.parametrize("method", METHODS)
def test_guessed_step_traced_for_xla_grows_like_a_few_backprop_layers(backprop_traced_growth, method):
    """XLA's bridge lowers the traced step with every op's Python stack trace (~14 KiB an op, TF 2.21).

    A guessed layer's ops are a few times a backprop layer's (two forward
    passes, a tangent, a guess, an update): 131 to 173 a layer against
    backprop's 21 here. The ordering's zero and mixing's shapes traced
    inline at every call made it 207 to 261, and the 16x1024 step's process
    peak 13-28 MiB higher (paired processes).
    """
    growth = traced_ops(method, DEEP) - traced_ops(method, SHALLOW)
    assert backprop_traced_growth >= DEEP - SHALLOW
    assert growth <= 9 * backprop_traced_growth, (growth / (DEEP - SHALLOW), backprop_traced_growth / (DEEP - SHALLOW))


@pytest.mark.skipif(
    tuple(int(part) for part in tf.__version__.split(".")[:2]) < (2, 21),
    reason="XLA before TensorFlow 2.21 compiles the row scatter to a dynamic-update-slice; measured on TF 2.18 "
           "(16x1024, batch 8192, 3 processes): process peak 0.37-0.38 of backprop's, within the 0.4 target",
)
def test_activation_mixing_writes_its_blocks_by_row_scatter_under_xla():
    """No dynamic-update-slice in activation_mixing's compiled step: its blocks are scattered by row.

    Written into a tensor of blocks by one block index, each mixing loop
    compiled to a dynamic-update-slice fusion, which XLA on CPU builds with
    its MLIR fusion emitter: the compiler's memory made the process's peak
    0.44 of backprop's at 16x1024 (batch 8192) against 0.38 with the row
    scatter, for the same buffers (3 processes each, TF 2.21).
    """
    program = compiled_program(*compiled_step("activation_mixing", SHALLOW, True), "optimized_hlo")
    assert " while(" in program and " scatter(" in program
    assert "dynamic-update-slice(" not in program
