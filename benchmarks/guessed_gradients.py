"""Guessed gradients (Singhal et al., arXiv 2312.04709) against backprop: alignment, accuracy, time, memory.

Three sections (``--sections``, default all):

- ``accuracy``: the paper's setting, a 3x128 ReLU MLP (Dense 128, Dense 128,
  Dense 10) trained with AdamW at batch 512 by every method for a fixed budget
  of epochs: cosine similarity between guess and true gradient at init and at
  the end (mean over ``--cosine-guesses`` guesses on one fixed training batch),
  train and test accuracy. CIFAR-10 with ``--data-dir`` (prepared for
  ``tfds.load(..., download=False)``), else scikit-learn's 8x8 digits.
- ``speed``: step time of each method with default options relative to a
  backprop step of the same model (plain ``keras.Model``), AdamW, random data:
  the paper's MLP at CIFAR-10 size (batch 512; targets: directional descent
  <= 1.0, every activation-space method <= 1.05 under XLA) and a 16x1024 ReLU
  MLP (batch 512). All models built first, then timed interleaved (5 steps of
  each per round on the paper's MLP, 1 on the deep one): median and quartiles
  of the per-round ratios; jit_compile True and False. A step is
  ``model.train_function(iterator)``, as ``fit`` runs it (``train_on_batch``
  also resets every metric per call, which would charge the wrappers'
  ``grad_norm`` metric a per-call cost ``fit`` does not have). Rows beside
  the defaults: the wrapper's own backprop step, ``noise="normal"`` (the
  paper's draws) and ``recompute=True``.
- ``memory``: depth sweep (``--memory-depths``, default 8,16,32) of ReLU MLPs
  (``--memory-width`` 1024, ``--memory-batch-size`` 8192, SGD) for backprop
  and each activation-space method with default options, jit_compile False and
  True: each configuration and measure in its own fresh process
  (``guessed_memory_probe.py``), ``--memory-repeats`` processes each,
  interleaved; the process's peak over the whole ``fit`` (first step, tracing
  and XLA compilation included) and TensorFlow's allocator peak, as ratios to
  backprop's (median and range) and growth from depth to depth as a ratio to
  backprop's growth. Targets: growth <= 0.2x backprop's, peak at 16 layers
  <= 0.4x backprop's.

    python benchmarks/guessed_gradients.py --sections speed
    python benchmarks/guessed_gradients.py --sections memory --memory-repeats 3
    python benchmarks/guessed_gradients.py --sections accuracy --data-dir /work/shared/tfds --epochs 40
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
from guessed_memory_probe import MEASURES, deep_mlp  # noqa: E402
from keras_gradops.data import standardize  # noqa: E402
from keras_gradops.training.guessed import METHODS  # noqa: E402
from keras_gradops.training.guessed.methods import ACTIVATION_SPACE_METHODS  # noqa: E402

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


def speed_configs():
    """(label, method, options): Keras' step, the wrapper's, every method's defaults, and variations."""
    configs = [("keras.Model (backprop)", None, {}), ("backprop (same code path)", "backprop", {})]
    configs += [(m, m, {}) for m in GUESSING_METHODS]
    configs += [(f"{m}, noise='normal'", m, dict(noise="normal")) for m in GUESSING_METHODS]
    configs += [(f"{m}, recompute=True", m, dict(recompute=True)) for m in ACTIVATION_SPACE_METHODS]
    return configs


def time_steps(make_net, inputs, batch_size, configs, jit_compile, rounds, warmup, steps_per_round):
    """{label: (median ms, median ratio, first quartile, third quartile)} of interleaved steps."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((batch_size, inputs)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, batch_size))
    batches = tf.data.Dataset.from_tensors((x, y)).repeat()
    models = {}
    for label, method, options in configs:
        net = make_net()
        model = net if method is None else kgo.GuessedGradientModel(net, method=method, **options)
        model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss=LOSS, jit_compile=jit_compile)
        model.make_train_function()
        iterator = iter(batches)
        for _ in range(warmup):
            model.train_function(iterator)
        models[label] = (model, iterator)
    times = {label: [] for label in models}
    for _ in range(rounds):
        for label, (model, iterator) in models.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                logs = model.train_function(iterator)
            float(logs["loss"])
            times[label].append((time.perf_counter() - start) / steps_per_round)
    base = np.array(times[configs[0][0]])
    table = {}
    for label, values in times.items():
        ratios = np.array(values) / base
        table[label] = (statistics.median(values) * 1e3, statistics.median(ratios),
                        np.percentile(ratios, 25), np.percentile(ratios, 75))
    return table


def speed_section(args):
    cases = [
        ("the paper's MLP (3072-128-128-10)", lambda: mlp(3072), 3072, args.rounds, 5, speed_configs()),
        (f"{args.deep_depth}x1024 ReLU MLP", lambda: deep_mlp(args.deep_depth, 1024, 1024), 1024,
         args.deep_rounds, 1, [c for c in speed_configs() if "normal" not in c[0]]),
    ]
    for name, make_net, inputs, rounds, steps, configs in cases:
        tables = {jit: time_steps(make_net, inputs, args.batch_size, configs, jit, rounds, args.warmup, steps)
                  for jit in (True, False)}
        print(f"\nstep time, {name}, batch {args.batch_size}, AdamW, random data: {rounds} interleaved rounds "
              f"of {steps} steps, "
              "median (quartiles) of the per-round ratios to the keras.Model backprop step; default options "
              "unless named (targets under XLA: directional descent <= 1.0, activation-space methods <= 1.05)")
        print("| configuration | XLA ms | XLA ratio | no XLA ms | no XLA ratio |")
        print("|---|---:|---:|---:|---:|")
        for label, *_ in configs:
            cells = []
            for jit in (True, False):
                ms, ratio, low, high = tables[jit][label]
                cells += [f"{ms:.2f}", f"{ratio:.3f} ({low:.2f}-{high:.2f})"]
            print(f"| {label} | " + " | ".join(cells) + " |")


# -- memory ----------------------------------------------------------------------------------


def run_probe(args, method, measure, jit_compile, depth):
    probe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guessed_memory_probe.py")
    command = [sys.executable, probe, "--method", method, "--measure", measure, "--jit-compile", jit_compile,
               "--depth", str(depth), "--width", str(args.memory_width), "--batch-size", str(args.memory_batch_size)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    if result["jit_compile"] != (jit_compile == "true"):
        raise RuntimeError(f"{method}: Keras did not compile with jit_compile={jit_compile}")
    return result


def _cell(values, base):
    values = sorted(values)
    return f"{statistics.median(values) / base:.2f} ({values[0] / base:.2f}-{values[-1] / base:.2f})"


def memory_section(args):
    methods = ["keras"] + list(ACTIVATION_SPACE_METHODS)
    depths = [int(d) for d in args.memory_depths.split(",")]
    measures = args.memory_measures.split(",")
    unknown = set(measures) - set(MEASURES)
    if unknown:
        raise ValueError(f"--memory-measures takes {MEASURES}; got {sorted(unknown)}")
    peaks = {}  # (measure, jit_compile, depth, method) -> [bytes], one per process
    first = None
    for _ in range(args.memory_repeats):  # interleaved: drift of the machine hits all alike
        for jit_compile in ("false", "true"):
            for depth in depths:
                for measure in measures:
                    for method in methods:
                        result = run_probe(args, method, measure, jit_compile, depth)
                        print("probe", json.dumps(result), flush=True)  # each process's figure, as it comes
                        peaks.setdefault((measure, jit_compile, depth, method), []).append(result["peak_bytes"])
                        first = first or result
    print(f"\npeak memory of model.fit (first step included), ReLU MLPs {args.memory_width} wide, batch "
          f"{args.memory_batch_size}, SGD, default options; {args.memory_repeats} fresh processes per configuration "
          f"and measure (one layer's activations {first['activation_bytes'] / MiB:.0f} MiB). Ratios: median (min-max) "
          "over processes / backprop's median; growth: (median at this depth - at the previous) / backprop's "
          "(targets: growth <= 0.2, 16-layer ratio <= 0.4)")
    for measure in measures:
        for jit_compile in ("false", "true"):
            header = [f"{d} layers" for d in depths] + [f"growth {a}->{b}" for a, b in zip(depths, depths[1:])]
            print(f"\n{measure} peak, jit_compile={jit_compile == 'true'}")
            print("| method | " + " | ".join(header) + " |")
            print("|---|" + "---:|" * (2 * len(depths) - 1))
            keras_median = {d: statistics.median(peaks[(measure, jit_compile, d, "keras")]) for d in depths}
            for method in methods:
                runs = {d: peaks[(measure, jit_compile, d, method)] for d in depths}
                median = {d: statistics.median(runs[d]) for d in depths}
                if method == "keras":
                    cells = [f"{median[d] / MiB:.0f} MiB ({min(runs[d]) / MiB:.0f}-{max(runs[d]) / MiB:.0f})"
                             for d in depths]
                    growth = [f"+{(median[b] - median[a]) / MiB:.0f} MiB" for a, b in zip(depths, depths[1:])]
                else:
                    cells = [_cell(runs[d], keras_median[d]) for d in depths]
                    growth = [f"{(median[b] - median[a]) / (keras_median[b] - keras_median[a]):.2f}"
                              for a, b in zip(depths, depths[1:])]
                label = "keras.Model (backprop)" if method == "keras" else method
                print(f"| {label} | " + " | ".join(cells + growth) + " |")


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
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds of the speed section (paper's MLP)")
    parser.add_argument("--deep-rounds", type=int, default=8, help="timed rounds of the deep MLP's step time")
    parser.add_argument("--deep-depth", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory-depths", default="8,16,32")
    parser.add_argument("--memory-width", type=int, default=1024)
    parser.add_argument("--memory-batch-size", type=int, default=8192)
    parser.add_argument("--memory-measures", default=",".join(MEASURES), help="process, allocator or both")
    parser.add_argument("--memory-repeats", type=int, default=3, help="processes per memory configuration")
    args = parser.parse_args()
    sections = {"accuracy": accuracy_section, "speed": speed_section, "memory": memory_section}
    for name in args.sections.split(","):
        sections[name](args)


if __name__ == "__main__":
    main()
