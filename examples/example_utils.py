"""What every example script shares: arguments, datasets, the results table, figures."""

import argparse
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")  # before pyplot: examples write PNG files, never open windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from keras_gradops.data import DatasetUnavailableError, load_tfds, synthetic_images  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def argument_parser(example, description):
    """A parser with the flags every example takes: --quick, --out-dir, --seed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="a ~1 minute run on tiny data made in-process (the test suite's smoke run)")
    parser.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "runs", example),
                        help="where figures go (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="base random seed")
    return parser


def add_data_dir_argument(parser):
    parser.add_argument(
        "--data-dir", default=None,
        help="a prepared tensorflow-datasets directory (holding cifar10/<version>/), e.g. "
             "/work/shared/tfds; default: TFDS' own (~/tensorflow_datasets, downloaded if missing). "
             "With --quick and no --data-dir, a random stand-in for CIFAR-10 is used.")


def cifar10(args, sizes):
    """CIFAR-10 as float32 images in [0, 1] and int64 labels: ``[(x, y), (x, y)]``.

    The first ``sizes = (num_train, num_test)`` examples of TFDS' cifar10
    splits; with ``--quick`` and no ``--data-dir``, a random stand-in of that
    size (``keras_gradops.data.synthetic_images``).
    """
    if args.quick and args.data_dir is None:
        print("--quick without --data-dir: a random stand-in for CIFAR-10 (not the real data).")
        splits = synthetic_images(*sizes, seed=args.seed)
    else:
        try:
            splits = load_tfds("cifar10", data_dir=args.data_dir)
        except DatasetUnavailableError as error:
            sys.exit(f"error: {error}")
        splits = [(x[:n], y[:n]) for (x, y), n in zip(splits, sizes)]
    return [(x.astype("float32") / 255.0, y.astype("int64")) for x, y in splits]


def format_table(headers, rows):
    """A Markdown table (pastes into the README as is)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value):
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
    return str(value)


def print_results(title, headers, rows):
    print(f"\n{title}\n{format_table(headers, rows)}\n", flush=True)


def save_figure(figure, out_dir, filename):
    """Writes ``figure`` as PNG into ``out_dir`` (created) and returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, filename)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"saved {path}")
    return path


class Stopwatch:
    """``with Stopwatch() as watch: ...`` then ``watch.seconds``."""

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start
