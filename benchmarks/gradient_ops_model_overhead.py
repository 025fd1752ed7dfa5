"""Train-step time of GradientOpsModel relative to a plain keras.Model.

A small ResNet at CIFAR-10 size (batch 128, random data) trained with Adam,
as a plain ``keras.Model`` and wrapped in ``GradientOpsModel`` with global-norm
clipping, gradient centralization and telemetry (``grad_norm``,
``clipped_fraction``), also with ``skip_nonfinite``; jit_compile True and
False, timed interleaved in one process. Prints median wall-clock and CPU-time
ratios; target <= 1.03 under XLA.

    python benchmarks/gradient_ops_model_overhead.py [--rounds 40] [--batch-size 128]
"""

import keras

import keras_gradops as kgo
from cifar_step_timing import (
    compile_for_timing,
    interleaved_medians,
    parse_timing_arguments,
    print_ratio_table,
    random_cifar_batch,
    small_resnet,
)

CONFIGS = {
    "keras.Model": lambda net: net,
    "clip+GC+telemetry": lambda net: kgo.GradientOpsModel(net, global_clipnorm=1.0, centralize=True),
    "clip+GC+telemetry+skip": lambda net: kgo.GradientOpsModel(
        net, global_clipnorm=1.0, centralize=True, skip_nonfinite=True
    ),
}
BASELINE = "keras.Model"


def main():
    args = parse_timing_arguments(__doc__.splitlines()[0])
    x, y = random_cifar_batch(args.batch_size)
    models = {(name, jit): compile_for_timing(wrap(small_resnet()), keras.optimizers.Adam(1e-3), jit)
              for jit in (True, False) for name, wrap in CONFIGS.items()}
    medians = interleaved_medians(models, x, y, args.rounds, args.warmup)
    rows = [(name, BASELINE, jit, medians[(name, jit)], medians[(BASELINE, jit)])
            for jit in (True, False) for name in CONFIGS]
    print_ratio_table(f"small ResNet, CIFAR-10 size, batch {args.batch_size}, Adam, "
                      f"{args.rounds} interleaved steps per config, medians", rows)


if __name__ == "__main__":
    main()
