"""Memory and time of one configuration of a PEFT keras_hub ViT, in this process alone; one JSON line.

Used by ``peft_vit.py``, which runs it once per configuration and repeat in
a fresh process. The model: a randomly initialized
``keras_hub.models.ViTBackbone``, its class token's features into a
``Dense(num_classes)`` head, fine-tuned parameter-efficiently (``--peft``):

- ``lora``: ``backbone.enable_lora(8)`` (backbone frozen, rank-8 LoRA on the
  attention's query and value), head trainable;
- ``prompts``: backbone frozen, ``kgo.layers.PromptTokens(16, index=1)``
  between its patch embedding and its encoder (VPT-shallow), head trainable.

``--method``: ``forward`` (the net's inference forward pass and the loss on
one batch, in a ``tf.function`` with ``--jit-compile``), ``backprop``
(``GuessedGradientModel(net, method="backprop")``) or any other
``GuessedGradientModel`` method, given nothing but the method, as a new user
would. Training methods run ``model.fit`` on a ``tf.data`` pipeline of random
images (dynamic batch dimension, as in real use) for ``--steps`` steps, the
first one (tracing, XLA compilation) included; ``forward`` is called as many
times, its first call (tracing, compilation) inside the window as well.

- ``process_peak_bytes``: peak resident memory (VmHWM, reset through
  ``/proc/self/clear_refs`` just before) minus the resident memory before.
- ``allocator_peak_bytes``: TensorFlow's BFC allocator (switched on here)
  peak minus its bytes in use before; on CPU it also serves XLA's buffers.
- ``xla_buffer_bytes`` (``--xla-buffers``, XLA only): the total size of the
  buffers XLA's buffer assignment gives the compiled train step (or forward
  function), parameters, constants and thread-local buffers excluded.
- ``step_seconds``: median time of the steps after the first;
  ``first_step_seconds``: the first one's.

A method the model rejects (or any failure) gives an ``error`` field.

    python benchmarks/peft_vit_probe.py --method directional_descent --peft prompts --jit-compile true \\
        --depth 2 --image-size 32 --patch-size 8 --hidden-dim 32 --num-heads 2 --mlp-dim 64 --xla-buffers
"""

import argparse
import json
import os
import statistics
import sys
import time

from guessed_memory_probe import resident_bytes

PROMPT_TOKENS = 16
LORA_RANK = 8


def add_model_arguments(parser):
    """The ViT's and the batch's sizes (ViT-B/16, batch 8, by default); the driver passes them through."""
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--hidden-dim", type=int, default=768)
    parser.add_argument("--num-heads", type=int, default=12)
    parser.add_argument("--mlp-dim", type=int, default=3072)
    parser.add_argument("--num-classes", type=int, default=10)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True,
                        help="'forward', 'backprop' or a GuessedGradientModel method")
    parser.add_argument("--peft", choices=["lora", "prompts"], required=True)
    parser.add_argument("--jit-compile", choices=["true", "false"], required=True)
    parser.add_argument("--depth", type=int, default=12)
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=3, help="steps (calls for 'forward'), the first included")
    parser.add_argument("--xla-buffers", action="store_true",
                        help="also report XLA's buffer assignment of the compiled step (jit_compile true only)")
    args = parser.parse_args()
    if args.xla_buffers and args.jit_compile != "true":
        parser.error("--xla-buffers needs --jit-compile true")
    return args


def peft_vit(args):
    """The ViT classifier of ``args`` with its PEFT applied: only the adapters (or prompts) and head train."""
    import keras
    import keras_hub

    import keras_gradops as kgo

    keras.utils.set_random_seed(0)
    size = args.image_size
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(size, size, 3), patch_size=args.patch_size, num_layers=args.depth, num_heads=args.num_heads,
        hidden_dim=args.hidden_dim, mlp_dim=args.mlp_dim)
    images = keras.Input((size, size, 3))
    if args.peft == "lora":
        backbone.enable_lora(LORA_RANK)
        features = backbone(images)
    else:
        backbone.trainable = False
        tokens = backbone.get_layer("vit_patching_and_embedding")(images)
        tokens = kgo.layers.PromptTokens(PROMPT_TOKENS, index=1)(tokens)
        features = backbone.get_layer("vit_encoder")(tokens)
    logits = keras.layers.Dense(args.num_classes)(features[:, 0])
    return keras.Model(images, logits)


def xla_buffer_bytes(function, x, y):
    """Total size of the buffers XLA assigns ``function(x, y)``: parameters, constants, thread-local excluded.

    As ``tests/test_guessed_memory.py``: traced first inside another
    ``tf.function``, as ``fit`` traces its step, then XLA's optimized HLO
    module read with its buffer assignment.
    """
    import tensorflow as tf
    from tensorflow.compiler.xla.service import hlo_pb2  # where TensorFlow 2.21 ships XLA's proto

    tf.function(lambda: function(x, y)).get_concrete_function()
    program = function.experimental_get_compiler_ir(x, y)(stage="optimized_hlo_proto_serialized")
    proto = hlo_pb2.HloProto.FromString(program)
    return sum(a.size for a in proto.buffer_assignment.buffer_allocations
               if not (a.is_entry_computation_parameter or a.is_constant or a.is_thread_local))


def measure(args):
    """The measures of ``args``'s configuration, as a dict (see the module docstring)."""
    import keras
    import tensorflow as tf

    import keras_gradops as kgo

    jit_compile = args.jit_compile == "true"
    net = peft_vit(args)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    size = args.image_size
    x = tf.random.normal((args.batch_size, size, size, 3), seed=1)
    y = tf.random.uniform((args.batch_size,), 0, args.num_classes, tf.int32, seed=2)
    result = {"trainable_params": sum(int(v.numpy().size) for v in net.trainable_variables),
              "total_params": int(net.count_params())}
    if args.method == "forward":
        step = tf.function(lambda x, y: loss(y, net(x, training=False)), jit_compile=jit_compile)
    else:
        model = kgo.GuessedGradientModel(net, method=args.method)
        model.compile(optimizer=keras.optimizers.SGD(1e-3), loss=loss, jit_compile=jit_compile)
        model.optimizer.build(model.trainable_variables)
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size).repeat()
    times = []

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)

    tf.config.experimental.reset_memory_stats("CPU:0")
    allocator_before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    resident_before = resident_bytes()[0]
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak (VmHWM) restarts from the current resident memory
    if args.method == "forward":
        for _ in range(args.steps):
            start = time.perf_counter()
            float(step(x, y))  # the value fetched: the call has finished
            times.append(time.perf_counter() - start)
    else:
        model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0, callbacks=[StepTimer()])
        result["jit_compile"] = bool(model.jit_compile)  # as Keras ran it
    result["process_peak_bytes"] = resident_bytes()[1] - resident_before
    result["allocator_peak_bytes"] = tf.config.experimental.get_memory_info("CPU:0")["peak"] - allocator_before
    result["step_seconds"] = statistics.median(times[1:]) if len(times) > 1 else None
    result["first_step_seconds"] = times[0]
    if args.xla_buffers:
        if args.method != "forward":
            step = tf.function(lambda x, y: model.train_step((x, y)), jit_compile=True)
        result["xla_buffer_bytes"] = xla_buffer_bytes(step, x, y)
    return result


def main():
    args = parse_args()
    os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"  # before TensorFlow starts
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import keras
    import keras_hub
    import tensorflow as tf

    result = {"method": args.method, "peft": args.peft, "depth": args.depth, "batch_size": args.batch_size,
              "jit_compile": args.jit_compile == "true", "process_peak_bytes": None, "allocator_peak_bytes": None,
              "xla_buffer_bytes": None, "step_seconds": None, "first_step_seconds": None,
              "trainable_params": None, "total_params": None}
    try:
        result.update(measure(args))
    except Exception as error:  # reported, not raised: the driver shows it beside the other runs
        result["error"] = f"{type(error).__name__}: {error}"
    result["versions"] = {"keras": keras.__version__, "tensorflow": tf.__version__, "keras_hub": keras_hub.__version__}
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
