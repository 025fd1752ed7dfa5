"""Guessed gradients (Singhal et al., arXiv 2312.04709) against backprop: alignment, accuracy, time, memory.

Three sections (``--sections``, default all):

- ``accuracy``: the paper's setting, a 3x128 ReLU MLP (Dense 128, Dense 128,
  Dense 10) trained with AdamW at batch 512 by every method for a fixed budget
  of epochs: cosine similarity between guess and true gradient at init and at
  the end (mean over ``--cosine-guesses`` guesses on one fixed training batch),
  train and test accuracy. CIFAR-10 with ``--data-dir`` (prepared for
  ``tfds.load(..., download=False)``), else scikit-learn's 8x8 digits.
- ``speed``: step time of each method relative to a backprop step of the same
  3x128 MLP (plain ``keras.Model``) at CIFAR-10 size (random data, batch 512):
  all models built first, then timed interleaved (one step of each per round),
  the median of the per-round ratios; jit_compile True and False. Target 1.0.
- ``memory``: peak memory of a training step relative to backprop on a deep
  wide ReLU MLP, each configuration in ``--memory-repeats`` fresh processes
  (``guessed_memory_probe.py``), median and range: TensorFlow's executor runs
  independent ops in a different order from run to run, and the peak follows.
  Target 0.6 (with ``recompute=True``).

    python benchmarks/guessed_gradients.py                       # digits, small memory model
    python benchmarks/guessed_gradients.py --data-dir /work/shared/tfds --epochs 40 \\
        --memory-width 2048 --memory-batch-size 4096 --memory-repeats 2   # CIFAR-10, 16x2048 MLP
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_gradops as kgo  # noqa: E402
from keras_gradops.data import standardize  # noqa: E402
from keras_gradops.training.guessed import METHODS  # noqa: E402

GUESSING_METHODS = [m for m in METHODS if m != "backprop"]
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MiB = 2 ** 20


def mlp(inputs, seed=0):
    """The paper's 3x128 MLP: Dense(128, relu), Dense(128, relu), Dense(10)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(128, activation="relu"),
                             keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)])


# -- data ------------------------------------------------------------------------------------


def load_cifar10(data_dir):
    import tensorflow_datasets as tfds

    splits = {}
    for split in ("train", "test"):
        images, labels = tfds.as_numpy(tfds.load("cifar10", split=split, data_dir=data_dir, download=False,
                                                 batch_size=-1, as_supervised=True))
        splits[split] = (images.reshape(len(images), -1).astype("float32") / 255.0, labels.astype("int64"))
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    x_train, x_test = standardize(x_train, x_test)
    return "CIFAR-10", x_train, y_train, x_test, y_test


def load_digits():
    from sklearn.datasets import load_digits as sklearn_digits

    x, y = sklearn_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order].astype("float32"), y[order].astype("int64")
    x_train, x_test = standardize(x[:1500], x[1500:])
    return "digits (sklearn, 8x8)", x_train, y[:1500], x_test, y[1500:]


# -- accuracy and alignment -----------------------------------------------------------------


def mean_cosine(model, net, x, y, guesses):
    """Mean cosine similarity between ``guesses`` guesses and the tape gradient on (x, y)."""
    with tf.GradientTape() as tape:
        loss = LOSS(y, net(x, training=True))
    true = tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(loss, net.trainable_variables)], 0)

    @tf.function
    def cosine(seed):
        guess = tf.concat([tf.reshape(g, [-1]) for g in model.guess_gradients(x, y, seed=seed)], 0)
        return tf.reduce_sum(guess * true) / (tf.norm(guess) * tf.norm(true))

    return float(np.mean([cosine(tf.constant([i, 1234], tf.int64)) for i in range(guesses)]))


def accuracy_section(args):
    name, x_train, y_train, x_test, y_test = load_cifar10(args.data_dir) if args.data_dir else load_digits()
    epochs = args.epochs or (40 if args.data_dir else 150)
    probe_x, probe_y = tf.constant(x_train[:args.batch_size]), tf.constant(y_train[:args.batch_size])
    rows = []
    for method in METHODS:
        start = time.perf_counter()
        net = mlp(x_train.shape[1])
        noise = args.noise if method != "backprop" else "normal"
        model = kgo.GuessedGradientModel(net, method=method, seed=1, noise=noise)
        model.compile(optimizer=keras.optimizers.AdamW(args.learning_rate), loss=LOSS, metrics=["accuracy"],
                      jit_compile=args.jit_compile)
        cosine_init = mean_cosine(model, net, probe_x, probe_y, args.cosine_guesses)
        model.fit(x_train, y_train, batch_size=args.batch_size, epochs=epochs, verbose=0)
        cosine_end = mean_cosine(model, net, probe_x, probe_y, args.cosine_guesses)
        _, train_accuracy = model.evaluate(x_train, y_train, batch_size=2048, verbose=0)
        _, test_accuracy = model.evaluate(x_test, y_test, batch_size=2048, verbose=0)
        rows.append((method, cosine_init, cosine_end, train_accuracy, test_accuracy, time.perf_counter() - start))
    print(f"\n{name}: 3x128 ReLU MLP, AdamW(lr={args.learning_rate}), batch {args.batch_size}, {epochs} "
          f"epochs, jit_compile={args.jit_compile}, noise {args.noise}; cosine = mean over {args.cosine_guesses} "
          "guesses on one training batch")
    print("| method | cosine at init | cosine at end | train accuracy | test accuracy | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, c0, c1, train, test, seconds in rows:
        print(f"| {method} | {c0:.4f} | {c1:.4f} | {train:.3f} | {test:.3f} | {seconds:.0f} |")


# -- step time -------------------------------------------------------------------------------


def speed_section(args):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((args.batch_size, 3072)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, args.batch_size))
    configs = [("keras.Model (backprop)", None, dict())] + [(m, m, dict()) for m in METHODS]
    configs += [(f"{m}, rademacher", m, dict(noise="rademacher")) for m in GUESSING_METHODS]
    configs += [(f"{m} (recompute), {noise}", m, dict(recompute=True, noise=noise))
                for m in ("activation_perturbation", "weight_transpose") for noise in ("normal", "rademacher")]
    for jit_compile in (True, False):
        models = {}
        for label, method, kwargs in configs:
            net = mlp(3072)
            model = net if method is None else kgo.GuessedGradientModel(net, method=method, **kwargs)
            model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss=LOSS, jit_compile=jit_compile)
            for _ in range(args.warmup):
                model.train_on_batch(x, y)
            models[label] = model
        times = {label: [] for label in models}
        for _ in range(args.rounds):
            for label, model in models.items():
                start = time.perf_counter()
                model.train_on_batch(x, y)
                times[label].append(time.perf_counter() - start)
        base = np.array(times[configs[0][0]])
        print(f"\nstep time, 3x128 MLP on 3072 inputs, batch {args.batch_size}, AdamW, jit_compile={jit_compile}: "
              f"{args.rounds} interleaved rounds, median of per-round ratios to the keras.Model backprop step "
              "(target <= 1.0); noise normal unless named")
        print("| method | median ms | ratio to backprop step |")
        print("|---|---:|---:|")
        for label in models:
            ratio = statistics.median(np.array(times[label]) / base)
            print(f"| {label} | {statistics.median(times[label]) * 1e3:.2f} | {ratio:.3f} |")


# -- memory ----------------------------------------------------------------------------------


def memory_section(args):
    probe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guessed_memory_probe.py")
    # (method, recompute, noise, Grappler's model pruner off)
    configs = [("keras", False, "normal", False), ("backprop", False, "normal", False),
               ("directional_descent", False, "normal", False), ("weight_transpose", False, "normal", False)]
    configs += [(m, True, "normal", False) for m in ("activation_perturbation", "weight_transpose",
                                                     "one_layer_downstream", "activation_mixing")]
    configs += [(m, True, "rademacher", False) for m in ("activation_perturbation", "weight_transpose")]
    configs += [("activation_perturbation", True, noise, True) for noise in ("normal", "rademacher")]
    results = {}
    for _ in range(args.memory_repeats):  # interleaved: drift of the machine hits all alike
        for config in configs:
            method, recompute, noise, no_pruning = config
            command = [sys.executable, probe, "--method", method, "--noise", noise, "--depth",
                       str(args.memory_depth), "--width", str(args.memory_width), "--batch-size",
                       str(args.memory_batch_size)]
            command += ["--recompute"] if recompute else []
            command += ["--disable-model-pruning"] if no_pruning else []
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results.setdefault(config, []).append(json.loads(output.strip().splitlines()[-1]))
    base = statistics.median(r["step_bytes"] for r in results[configs[0]])
    first = results[configs[0]][0]
    print(f"\npeak memory of a training step, {args.memory_depth}x{args.memory_width} ReLU MLP, batch "
          f"{args.memory_batch_size}, SGD, jit_compile=False, {args.memory_repeats} processes per configuration "
          f"(weights {first['weight_bytes'] / MiB:.0f} MiB, one layer's activations "
          f"{first['activation_bytes'] / MiB:.0f} MiB); ratio = median step peak / median keras step peak "
          "(target <= 0.6 with recompute)")
    print("| method | recompute | noise | model pruning | step peak MiB, median (min-max) "
          "| ratio to keras backprop, median (min-max) |")
    print("|---|---|---|---|---:|---:|")
    for (method, recompute, noise, no_pruning), runs in results.items():
        peaks = sorted(r["step_bytes"] for r in runs)
        label = "keras.Model (backprop)" if method == "keras" else method
        noise = "" if method in ("keras", "backprop") else noise
        median = statistics.median(peaks)
        print(f"| {label} | {recompute} | {noise} | {'off' if no_pruning else 'on'} | {median / MiB:.0f} "
              f"({peaks[0] / MiB:.0f}-{peaks[-1] / MiB:.0f}) | {median / base:.2f} "
              f"({peaks[0] / base:.2f}-{peaks[-1] / base:.2f}) |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="accuracy,speed,memory")
    parser.add_argument("--data-dir", default=None, help="tensorflow-datasets directory holding cifar10")
    parser.add_argument("--epochs", type=int, default=None, help="default: 40 on CIFAR-10, 150 on digits")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--cosine-guesses", type=int, default=8)
    parser.add_argument("--jit-compile", action="store_true", help="train the accuracy section under XLA")
    parser.add_argument("--noise", default="normal", choices=["normal", "rademacher"],
                        help="the guesses' noise in the accuracy section")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds of the speed section")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory-depth", type=int, default=16)
    parser.add_argument("--memory-width", type=int, default=1024)
    parser.add_argument("--memory-batch-size", type=int, default=2048)
    parser.add_argument("--memory-repeats", type=int, default=3, help="processes per memory configuration")
    args = parser.parse_args()
    sections = {"accuracy": accuracy_section, "speed": speed_section, "memory": memory_section}
    for name in args.sections.split(","):
        sections[name](args)


if __name__ == "__main__":
    main()
