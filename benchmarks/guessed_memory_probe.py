"""Peak memory of ``model.fit`` for one configuration, in this process alone.

Used by ``guessed_gradients.py``, which runs it once per configuration and
measure in a fresh process. The model trains with ``fit`` on a ``tf.data``
pipeline (dynamic batch dimension, as in real use) for ``--steps`` steps,
the first one (tracing, XLA compilation) included. Two measures:

- ``process``: the growth of the process's peak resident memory (VmHWM,
  reset through ``/proc/self/clear_refs`` just before ``fit``) over the
  resident memory before ``fit``: what a user feels, with everything
  TensorFlow, XLA and the allocator keep.
- ``allocator``: TensorFlow's BFC allocator (switched on for this process)
  peak bytes over ``fit`` minus the bytes in use before: every tensor, and
  in TensorFlow 2.21 on CPU also XLA's buffers, which it allocates through
  it; not what the compiler or the runtime use beside.

Only the method is passed to ``GuessedGradientModel`` unless asked, as a new
user would. One JSON line.

    python benchmarks/guessed_memory_probe.py --method weight_transpose --depth 16 --jit-compile false
"""

import argparse
import json
import os
import sys

MEASURES = ("process", "allocator")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, help="'keras' (plain backprop model) or a GuessedGradientModel method")
    parser.add_argument("--measure", choices=MEASURES, default="process")
    parser.add_argument("--jit-compile", choices=["true", "false"], required=True)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=2, help="training steps, the first included")
    parser.add_argument("--options", default="{}", help="JSON of GuessedGradientModel options beyond the method")
    return parser.parse_args()


def deep_mlp(depth, width, inputs, seed=0):
    """``depth`` ReLU Dense layers of ``width`` units on ``inputs`` features, then Dense(10).

    Imports Keras when called: this module is imported before TensorFlow may start.
    """
    import keras

    keras.utils.set_random_seed(seed)
    layers = [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
    return keras.Sequential([keras.Input((inputs,)), *layers, keras.layers.Dense(10)])


def resident_bytes():
    """(current, peak) resident bytes of this process, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def main():
    args = parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.measure == "allocator":
        os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"  # must be set before TensorFlow starts
    import keras
    import tensorflow as tf

    import keras_gradops as kgo

    net = deep_mlp(args.depth, args.width, args.width)
    model = net if args.method == "keras" else kgo.GuessedGradientModel(net, method=args.method,
                                                                       **json.loads(args.options))
    model.compile(optimizer=keras.optimizers.SGD(1e-3), jit_compile=args.jit_compile == "true",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    x = tf.random.normal((args.batch_size, args.width))
    y = tf.random.uniform((args.batch_size,), 0, 10, tf.int32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size).repeat()
    if args.measure == "allocator":
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the peak (VmHWM) restarts from the current resident memory
        before = resident_bytes()[0]
    model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
    if args.measure == "allocator":
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    else:
        peak = resident_bytes()[1] - before
    print(json.dumps({
        "method": args.method, "measure": args.measure, "jit_compile": bool(model.jit_compile),
        "depth": args.depth, "peak_bytes": peak, "activation_bytes": args.batch_size * args.width * 4,
        "weight_bytes": sum(int(v.numpy().nbytes) for v in net.trainable_variables),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
