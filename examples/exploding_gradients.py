"""Exploding gradients in a recurrent network, and choosing the clipping threshold.

The adding problem (Hochreiter & Schmidhuber 1997; Pascanu et al., ICML 2013):
each example is a sequence of ``--sequence-length`` pairs (value ~ U(0, 1),
marker); exactly two markers are 1, one in each half; the target is the sum of
the two marked values. Predicting the mean scores MSE 1/6 ~ 0.167; solving it
needs the network to carry information across ~length/2 steps. Per seed, one
LSTM is trained from the same weights on the same batches with Adam at 150x
its usual learning rate (0.15), once per clipping rule: none, value clipping,
global-norm clipping at fixed thresholds over two orders of magnitude
(``--clip-norms``, default 0.1, 1 and 10), and the adaptive thresholds
``AutoClip()`` and ``ZClip()`` with their defaults (ZClip's reference default
also caps the norm at 1.0, so it runs once more without that cap). The
question: do the adaptive rules, untuned, match the best fixed threshold?

The pre-clip global norm and the threshold in force at every step are read
from the optimizer's ``grad_norm`` and ``grad_clip_threshold``
(``with_gradient_centralization(..., conv_only=True)`` centralizes nothing in
a recurrent network: it is the Keras optimizer plus those records and
clipping of the gradient summed over replicas).

    python examples/exploding_gradients.py           # ~6 minutes on 2 CPU cores (3 seeds)
    python examples/exploding_gradients.py --quick   # a few seconds
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import example_utils  # noqa: E402

import keras_gradops as kgo  # noqa: E402

BASELINE_MSE = 1.0 / 6.0  # Var(U1 + U2): always predicting 1.0
SOLVED_MSE = 0.01


def adding_problem(num_examples, sequence_length, rng):
    """``(x, y)``: x ``(n, length, 2)`` of (value, marker), y ``(n, 1)`` the sum of the marked values."""
    values = rng.uniform(size=(num_examples, sequence_length))
    markers = np.zeros_like(values)
    rows = np.arange(num_examples)
    markers[rows, rng.integers(0, sequence_length // 2, num_examples)] = 1.0
    markers[rows, rng.integers(sequence_length // 2, sequence_length, num_examples)] = 1.0
    x = np.stack([values, markers], axis=-1).astype("float32")
    y = np.sum(values * markers, axis=1, keepdims=True).astype("float32")
    return x, y


CELLS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "simple_rnn": keras.layers.SimpleRNN}


def build_model(cell, sequence_length, units):
    inputs = keras.Input((sequence_length, 2), name="sequence")
    hidden = CELLS[cell](units)(inputs)
    return keras.Model(inputs, keras.layers.Dense(1, name="sum")(hidden), name=f"adding_{cell}")


def clipping_settings(args):
    """``{name: optimizer clipping arguments}``; a callable value makes a fresh threshold per run."""
    settings = {"no clipping": {}, f"value {args.clip_value:g}": {"clipvalue": args.clip_value}}
    settings.update({f"global norm {c:g}": {"global_clipnorm": c} for c in args.clip_norms})
    settings["AutoClip()"] = {"global_clipnorm": kgo.AutoClip}
    settings["ZClip()"] = {"global_clipnorm": kgo.ZClip}
    settings["ZClip(max_norm=None)"] = {"global_clipnorm": lambda: kgo.ZClip(max_norm=None)}
    return settings


def make_optimizer(args, clipping):
    config = {"learning_rate": args.learning_rate,
              **{name: value() if callable(value) else value for name, value in clipping.items()}}
    if args.momentum:
        config["momentum"] = args.momentum
    base = type(keras.optimizers.get(args.optimizer))(**config)
    # conv_only=True: no LSTM/Dense kernel is centralized; the optimizer gains `grad_norm`.
    return kgo.with_gradient_centralization(base, conv_only=True)


class GradientNormLog(keras.callbacks.Callback):
    """Records the optimizer's pre-clip gradient norm and global-norm threshold (NaN if none) every step,
    and a validation MSE every ``every`` steps.

    Stops training at the first non-finite loss (the weights are NaN from then on).
    """

    def __init__(self, validation, every):
        super().__init__()
        self.validation, self.every = validation, every
        self.norms, self.thresholds, self.eval_steps, self.eval_mse = [], [], [], []
        self.diverged_at = None

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        self.norms.append(float(optimizer.grad_norm.numpy()))
        threshold = optimizer.grad_clip_threshold
        self.thresholds.append(float("nan") if threshold is None else float(threshold.numpy()))
        step = len(self.norms)
        if not np.isfinite(logs["loss"]):
            self.diverged_at = step
            self.model.stop_training = True
        elif step % self.every == 0:
            self._evaluate(step)

    def on_train_end(self, logs=None):
        if self.diverged_at is None and (not self.eval_steps or self.eval_steps[-1] != len(self.norms)):
            self._evaluate(len(self.norms))

    def _evaluate(self, step):
        x, y = self.validation
        prediction = self.model(x, training=False)
        self.eval_steps.append(step)
        self.eval_mse.append(float(np.mean((np.asarray(prediction) - y) ** 2)))


def train(name, clipping, initial_weights, data, args, seed):
    (x_train, y_train), validation = data
    keras.utils.set_random_seed(seed)
    model = build_model(args.cell, args.sequence_length, args.units)
    model.set_weights(initial_weights)
    model.compile(optimizer=make_optimizer(args, clipping), loss="mse")
    log = GradientNormLog(validation, args.eval_every)
    print(f"\n== {name} ==")
    with example_utils.Stopwatch() as watch:
        model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                  callbacks=[log], verbose=args.verbose)
    return log, watch.seconds


def plot(logs, args):
    """Two figures for one seed: each rule's norm with its threshold drawn over it, and the validation MSE."""
    rows = len(logs)
    figure, axes = plt.subplots(rows, 1, figsize=(9, 1.6 * rows + 1), sharex=True, squeeze=False)
    for ax, (name, log) in zip(axes[:, 0], logs.items()):
        steps = np.arange(1, len(log.norms) + 1)
        norms, thresholds = np.asarray(log.norms), np.asarray(log.thresholds)
        finite = np.isfinite(norms)
        ax.plot(steps[finite], norms[finite], color="tab:blue", linewidth=0.6, label="pre-clip norm")
        shown = np.isfinite(thresholds) & (thresholds < 1e30)  # ZClip without a spike has none in force
        if shown.any():
            ax.plot(steps, np.where(shown, thresholds, np.nan), color="tab:red", linewidth=0.9, marker=".",
                    markersize=2, label="threshold in force")
        if log.diverged_at is not None:
            ax.axvline(log.diverged_at, color="black", linestyle=":", label="loss NaN")
        ax.set(yscale="log", ylabel="norm")
        ax.set_title(name, fontsize=9, loc="left")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("training step")
    figure.suptitle(f"Adding problem, length {args.sequence_length}: {args.cell}({args.units}), "
                    f"{args.optimizer} lr {args.learning_rate}, seed {args.seed}", fontsize=10)
    norms_path = example_utils.save_figure(figure, args.out_dir, "gradient_norms.png")

    figure, ax = plt.subplots(figsize=(9, 4))
    for name, log in logs.items():
        ax.plot(log.eval_steps, log.eval_mse, marker=".", linewidth=1, label=name)
    ax.axhline(BASELINE_MSE, color="gray", linestyle="--", linewidth=0.8, label="predict the mean (1/6)")
    ax.set(yscale="log", xlabel="training step", ylabel="validation MSE")
    ax.legend(fontsize=7)
    return norms_path, example_utils.save_figure(figure, args.out_dir, "validation_mse.png")


def main(argv=None):
    parser = example_utils.argument_parser("exploding_gradients", __doc__.splitlines()[0])
    parser.add_argument("--sequence-length", type=int, default=100)
    parser.add_argument("--cell", choices=sorted(CELLS), default="lstm")
    parser.add_argument("--units", type=int, default=32)
    parser.add_argument("--optimizer", default="adam", help="a Keras optimizer name")
    parser.add_argument("--learning-rate", type=float, default=0.15)
    parser.add_argument("--momentum", type=float, default=0.0, help="for --optimizer sgd")
    parser.add_argument("--clip-norms", type=float, nargs="+", default=[0.1, 1.0, 10.0],
                        help="fixed global-norm thresholds to compare")
    parser.add_argument("--clip-value", type=float, default=0.1)
    parser.add_argument("--num-train", type=int, default=None, help="default 32000 (--quick: 640)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds; default 3 (--quick: 1)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=None, help="steps; default 50 (--quick: 10)")
    parser.add_argument("--verbose", type=int, default=1, help="Keras fit verbosity (1: progress bars)")
    args = parser.parse_args(argv)
    args.num_train = args.num_train or (640 if args.quick else 32000)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.eval_every = args.eval_every or (10 if args.quick else 50)

    runs = {name: [] for name in clipping_settings(args)}
    for seed in range(args.seed, args.seed + args.seeds):
        rng = np.random.default_rng(seed)
        num_validation = 64 if args.quick else 512
        data = (adding_problem(args.num_train, args.sequence_length, rng),
                adding_problem(num_validation, args.sequence_length, rng))
        keras.utils.set_random_seed(seed)
        initial_weights = build_model(args.cell, args.sequence_length, args.units).get_weights()
        for name, clipping in clipping_settings(args).items():
            runs[name].append(train(f"{name}, seed {seed}", clipping, initial_weights, data, args, seed))

    headers = ["clipping", "final val MSE per seed", f"solved (MSE < {SOLVED_MSE})", "median grad norm",
               "max grad norm", "steps clipped", "median threshold", "runs with NaN loss", "time per run (s)"]
    rows = [summary_row(name, seeds, args) for name, seeds in runs.items()]
    example_utils.print_results(
        f"Adding problem (length {args.sequence_length}, {args.num_train} examples x {args.epochs} epoch(s), "
        f"batch {args.batch_size}), {args.cell}({args.units}), {args.optimizer} lr {args.learning_rate}, "
        f"seeds {args.seed}..{args.seed + args.seeds - 1}; predicting the mean scores {BASELINE_MSE:.3f}:",
        headers, rows)
    figures = plot({name: seeds[0][0] for name, seeds in runs.items()}, args)
    return {"runs": runs, "rows": rows, "figures": figures}


def summary_row(name, seeds, args):
    logs = [log for log, _ in seeds]
    norms = np.concatenate([log.norms for log in logs])
    thresholds = np.concatenate([log.thresholds for log in logs])
    finite = norms[np.isfinite(norms)]
    final = [log.eval_mse[-1] if log.diverged_at is None else float("nan") for log in logs]
    global_norm_rule = np.isfinite(thresholds).any()
    in_force = thresholds[np.isfinite(thresholds) & (thresholds < 1e30)]  # ZClip without a spike: none
    return [
        name, " / ".join(f"{mse:.4f}" for mse in final),
        f"{sum(mse < SOLVED_MSE for mse in final)}/{len(logs)}",
        f"{np.median(finite):.3g}", f"{np.max(finite):.3g}" if len(finite) == len(norms) else "inf/NaN",
        f"{np.mean(norms > thresholds):.0%}" if global_norm_rule else "-",
        (f"{np.median(in_force):.3g} ({len(in_force) / len(thresholds):.0%} of steps)" if len(in_force)
         else "none") if global_norm_rule else "-",
        f"{sum(log.diverged_at is not None for log in logs)}/{len(logs)}",
        f"{np.mean([seconds for _, seconds in seeds]):.1f}",
    ]


if __name__ == "__main__":
    main()
