"""Peak memory of a training step of one configuration, in this process alone.

Used by ``guessed_gradients.py``, which runs it once per configuration in a
fresh process. TensorFlow's CPU allocator is switched to BFC, which counts
the bytes of every tensor it hands out (TensorFlow's executor; XLA's own
buffers are not counted, so the probe runs with ``jit_compile=False``). The
model trains with ``fit`` on a ``tf.data`` pipeline (dynamic batch dimension,
as in real use) for ``--steps`` steps; the first step (tracing, one-off
allocations) is not scored. Reported: the largest allocator peak of a later
step minus the bytes allocated before the first step (weights, optimizer
slots, the data), so memory a step leaves behind counts too. One JSON line.

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
    """``depth`` ReLU Dense layers of ``width`` units on ``width`` inputs, then Dense(classes)."""
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
    return keras.Sequential([keras.Input((width,)), *layers, keras.layers.Dense(classes)])


class StepPeaks(keras.callbacks.Callback):
    """Records the allocator's peak bytes of every training step."""

    def __init__(self):
        super().__init__()
        self.peaks = []

    def on_train_batch_begin(self, batch, logs=None):
        tf.config.experimental.reset_memory_stats(DEVICE)

    def on_train_batch_end(self, batch, logs=None):
        self.peaks.append(tf.config.experimental.get_memory_info(DEVICE)["peak"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, help="'keras' (plain backprop model) or a guessing method")
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--noise", default="normal", choices=["normal", "rademacher"])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3, help="training steps; the first is not scored")
    parser.add_argument("--disable-model-pruning", action="store_true",
                        help="turn off Grappler's model pruner (tf.config.optimizer), which can undo the "
                             "ordering recompute=True relies on")
    args = parser.parse_args()
    if args.disable_model_pruning:
        tf.config.optimizer.set_experimental_options({"disable_model_pruning": True})

    net = deep_mlp(args.depth, args.width)
    model = net if args.method == "keras" else kgo.GuessedGradientModel(
        net, method=args.method, recompute=args.recompute, seed=0, noise=args.noise)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    x = tf.random.normal((args.batch_size, args.width))
    y = tf.random.uniform((args.batch_size,), 0, 10, tf.int32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size).repeat()
    before = tf.config.experimental.get_memory_info(DEVICE)["current"]
    peaks = StepPeaks()
    model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0, callbacks=[peaks])
    print(json.dumps({
        "method": args.method, "recompute": args.recompute, "noise": args.noise,
        "disable_model_pruning": args.disable_model_pruning,
        "step_bytes": max(peaks.peaks[1:]) - before, "first_step_bytes": peaks.peaks[0] - before,
        "weight_bytes": sum(int(v.numpy().nbytes) for v in net.trainable_variables),
        "activation_bytes": args.batch_size * args.width * 4,
    }))


if __name__ == "__main__":
    main()
