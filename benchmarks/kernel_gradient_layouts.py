"""A Dense kernel's gradient under XLA: TensorFlow's ``matmul(x, c, transpose_a=True)`` vs ``(c^T x)^T``.

The guessed step computes ``x^T c`` as ``(c^T x)^T`` under XLA for narrow
kernels (``keras_gradops.training.guessed.kernel_gradient``). This measures
both forms, each compiled alone (ten products a call, so the call's overhead
is shared), interleaved over rounds, at batch x inputs x outputs shapes, and
prints the median time of one product and the ratio of the transposed form
to the plain one (below 1: the transposed form is faster) with its
quartiles, and which form the rule (``transposed_layout_pays``) picks.

    python benchmarks/kernel_gradient_layouts.py
    python benchmarks/kernel_gradient_layouts.py --shapes 512x3072x128,512x1024x1024 --rounds 20
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

from keras_gradops.training.guessed.kernel_gradient import transposed_layout_pays, transposed_product

DEFAULT_SHAPES = ("512x3072x128,512x1024x128,512x512x128,512x784x128,512x128x128,512x128x10,"
                  "512x1024x256,512x3072x512,512x1024x1024,4096x1024x1024")
PRODUCTS = 10


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BATCHxINPUTSxOUTPUTS")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    try:
        args.shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    except ValueError:
        parser.error(f"--shapes must be BATCHxINPUTSxOUTPUTS, comma-separated. Received: {args.shapes!r}")
    if any(len(shape) != 3 or min(shape) < 1 for shape in args.shapes):
        parser.error(f"--shapes must be three positive sizes each. Received: {args.shapes!r}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1. Received: {args.rounds}")
    return args


def compiled(product):
    """``PRODUCTS`` gradients of ``x`` and scaled ``c``, summed, in one XLA program."""
    @tf.function(jit_compile=True)
    def run(x, c):
        return tf.add_n([product(x, c * (1.0 + k)) for k in range(PRODUCTS)])
    return run


def main():
    args = parse_args()
    forms = {"plain": compiled(lambda x, c: tf.matmul(x, c, transpose_a=True)), "transposed": compiled(transposed_product)}
    print(f"{'batch x in x out':>18} {'plain ms':>9} {'transposed ms':>14} {'ratio (quartiles)':>20}  rule picks")
    rng = np.random.default_rng(0)
    for batch, inputs, outputs in args.shapes:
        x = tf.constant(rng.standard_normal((batch, inputs), dtype=np.float32))
        c = tf.constant(rng.standard_normal((batch, outputs), dtype=np.float32))
        for run in forms.values():
            run(x, c).numpy()
        times = {name: [] for name in forms}
        for _ in range(args.rounds):
            for name, run in forms.items():
                start = time.perf_counter()
                run(x, c).numpy()
                times[name].append((time.perf_counter() - start) / PRODUCTS * 1e3)
        ratio = np.array(times["transposed"]) / np.array(times["plain"])
        picks = "transposed" if transposed_layout_pays(outputs) else "plain"
        print(f"{batch:>6} x {inputs:>4} x {outputs:>4} {statistics.median(times['plain']):9.2f} "
              f"{statistics.median(times['transposed']):14.2f} {np.median(ratio):8.2f} "
              f"({np.percentile(ratio, 25):.2f}-{np.percentile(ratio, 75):.2f})  {picks}")


if __name__ == "__main__":
    main()
