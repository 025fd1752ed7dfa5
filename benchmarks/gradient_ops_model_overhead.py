"""Train-step time of GradientOpsModel relative to a plain keras.Model.

A small ResNet at CIFAR-10 size (batch 128, random data) trained with Adam,
as a plain ``keras.Model`` and wrapped in ``GradientOpsModel`` with global-norm
clipping, gradient centralization and telemetry (``grad_norm``,
``clipped_fraction``), also with ``skip_nonfinite``; jit_compile True and
False. All models are built first, then timed interleaved (one step of each
per round) in one process, so drift of the machine hits all alike. Prints the
median wall-clock step times and their ratios, and the same for the process
CPU time (less sensitive to other processes on a shared machine); target
<= 1.03 under XLA.

    python benchmarks/gradient_ops_model_overhead.py [--rounds 40] [--batch-size 128]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_gradops as kgo  # noqa: E402
from cifar_resnet import small_resnet  # noqa: E402

CONFIGS = {
    "keras.Model": lambda net: net,
    "clip+GC+telemetry": lambda net: kgo.GradientOpsModel(net, global_clipnorm=1.0, centralize=True),
    "clip+GC+telemetry+skip": lambda net: kgo.GradientOpsModel(
        net, global_clipnorm=1.0, centralize=True, skip_nonfinite=True
    ),
}
BASELINE = "keras.Model"


def compiled_model(wrap, jit_compile):
    model = wrap(small_resnet())
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch_size)

    models = {(name, jit): compiled_model(wrap, jit) for jit in (True, False) for name, wrap in CONFIGS.items()}
    for model in models.values():
        for _ in range(args.warmup):
            model.train_on_batch(x, y)

    wall = {key: [] for key in models}
    cpu = {key: [] for key in models}
    for _ in range(args.rounds):
        for key, model in models.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            model.train_on_batch(x, y)
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)

    wall = {key: statistics.median(t) for key, t in wall.items()}
    cpu = {key: statistics.median(t) for key, t in cpu.items()}
    print(f"\nsmall ResNet, CIFAR-10 size, batch {args.batch_size}, Adam, "
          f"{args.rounds} interleaved steps per config, medians")
    print(f"| {'model':<24} | {'jit_compile':<11} | {'wall ms':>8} | {'wall ratio':>10} | "
          f"{'CPU ms':>7} | {'CPU ratio':>9} |")
    print(f"|{'-' * 26}|{'-' * 13}|{'-' * 10}|{'-' * 12}|{'-' * 9}|{'-' * 11}|")
    for jit in (True, False):
        base_wall, base_cpu = wall[(BASELINE, jit)], cpu[(BASELINE, jit)]
        for name in CONFIGS:
            key = (name, jit)
            print(f"| {name:<24} | {str(jit):<11} | {wall[key] * 1e3:>8.1f} | {wall[key] / base_wall:>10.3f} | "
                  f"{cpu[key] * 1e3:>7.1f} | {cpu[key] / base_cpu:>9.3f} |")


if __name__ == "__main__":
    main()
