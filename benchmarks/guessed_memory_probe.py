"""Peak memory of one training step of one configuration, in this process alone.

Used by ``guessed_gradients.py``, which runs it once per configuration in a
fresh process. TensorFlow's CPU allocator is switched to BFC, which counts
the bytes of every tensor it hands out; the step's memory is the allocator's
peak during one ``train_on_batch`` minus what was allocated before it (the
weights, the optimizer's slots, the batch). Prints one JSON line.

    python benchmarks/guessed_memory_probe.py --method keras --depth 16 --width 2048 --batch-size 4096
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"  # must be set before TensorFlow starts

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_gradops as kgo  # noqa: E402

DEVICE = "CPU:0"


def deep_mlp(depth, width, classes=10):
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
    return keras.Sequential([keras.Input((width,)), *layers, keras.layers.Dense(classes)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, help="'keras' (plain backprop model) or a guessing method")
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--jit-compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps before the measured one")
    args = parser.parse_args()

    net = deep_mlp(args.depth, args.width)
    model = net if args.method == "keras" else kgo.GuessedGradientModel(
        net, method=args.method, recompute=args.recompute, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), jit_compile=args.jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    x = tf.random.normal((args.batch_size, args.width))
    y = tf.random.uniform((args.batch_size,), 0, 10, tf.int32)
    built = tf.config.experimental.get_memory_info(DEVICE)["current"]
    for _ in range(args.warmup):
        model.train_on_batch(x, y)
    before = tf.config.experimental.get_memory_info(DEVICE)["current"]
    tf.config.experimental.reset_memory_stats(DEVICE)
    model.train_on_batch(x, y)
    peak = tf.config.experimental.get_memory_info(DEVICE)["peak"]
    print(json.dumps({
        "method": args.method, "recompute": args.recompute, "jit_compile": args.jit_compile,
        "resident_bytes": before, "built_bytes": built, "step_peak_bytes": peak - before,
        "weight_bytes": sum(int(v.numpy().nbytes) for v in net.trainable_variables),
    }))


if __name__ == "__main__":
    main()
