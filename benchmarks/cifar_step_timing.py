"""Shared harness of the step-time benchmarks: a small ResNet at CIFAR-10 size
(32x32x3, 10 classes), a random batch, and interleaved timing.

Every configuration is built and warmed up first, then timed interleaved (one
step of each per round) in one process, so drift of the machine hits all of
them alike. Medians of wall-clock and of process CPU time are returned; CPU
time is less sensitive to other processes on a shared machine.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402


def _residual_block(x, filters, stride):
    shortcut = x
    y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.ReLU()(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = keras.layers.BatchNormalization()(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
        shortcut = keras.layers.BatchNormalization()(shortcut)
    return keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))


def small_resnet(widths=(16, 32, 64), seed=0):
    """conv3x3 stem, one residual block per width (stride 2 after the first), GAP, Dense(10)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(widths[0], 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    for i, width in enumerate(widths):
        x = _residual_block(x, width, stride=1 if i == 0 else 2)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="small_resnet")


def compile_for_timing(model, optimizer, jit_compile):
    model.compile(optimizer=optimizer, jit_compile=jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def parse_timing_arguments(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=40, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    parser.add_argument("--batch-size", type=int, default=128)
    return parser.parse_args()


def random_cifar_batch(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, 32, 32, 3)).astype("float32")
    return x, rng.integers(0, 10, batch_size)


def interleaved_medians(models, x, y, rounds, warmup):
    """``{key: (median wall s, median CPU s)}`` of ``train_on_batch`` per model."""
    for model in models.values():
        for _ in range(warmup):
            model.train_on_batch(x, y)
    wall = {key: [] for key in models}
    cpu = {key: [] for key in models}
    for _ in range(rounds):
        for key, model in models.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            model.train_on_batch(x, y)
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    return {key: (statistics.median(wall[key]), statistics.median(cpu[key])) for key in models}


def print_ratio_table(title, rows):
    """``rows``: ``(name, baseline name, jit, (wall, cpu), (base wall, base cpu))``."""
    print(f"\n{title}")
    print(f"| {'configuration':<24} | {'baseline':<12} | {'jit_compile':<11} | {'wall ms':>8} | "
          f"{'wall ratio':>10} | {'CPU ms':>7} | {'CPU ratio':>9} |")
    print(f"|{'-' * 26}|{'-' * 14}|{'-' * 13}|{'-' * 10}|{'-' * 12}|{'-' * 9}|{'-' * 11}|")
    for name, base_name, jit, (wall, cpu), (base_wall, base_cpu) in rows:
        print(f"| {name:<24} | {base_name:<12} | {str(jit):<11} | {wall * 1e3:>8.1f} | "
              f"{wall / base_wall:>10.3f} | {cpu * 1e3:>7.1f} | {cpu / base_cpu:>9.3f} |")
