"""Guessed-gradient PEFT of a keras_hub ViT: activation memory and step time against a forward pass and backprop.

A randomly initialized ``keras_hub.models.ViTBackbone`` (ViT-B/16 by
default: 224x224 images, 16x16 patches, 12 layers, width 768, 12 heads, MLP
3072) with its class token's features into a ``Dense(10)`` head, batch 8,
SGD, fine-tuned parameter-efficiently: ``lora`` (``backbone.enable_lora(8)``)
or ``prompts`` (frozen backbone, 16 ``kgo.layers.PromptTokens`` after the
class token). For each method (``forward``: the inference forward pass and
the loss, no training; ``backprop`` and the guessed methods:
``GuessedGradientModel``'s ``fit``), jit_compile and depth, every repeat in
a fresh process (``peft_vit_probe.py``), repeats interleaved:

- process peak: growth of the peak resident memory over the first
  ``--steps`` steps (tracing and compilation included) above the memory before;
- allocator peak: TensorFlow's BFC allocator peak above its bytes in use
  before (on CPU it also serves XLA's buffers);
- XLA buffers (``--xla-buffers``, XLA only): the buffers XLA's buffer
  assignment gives the compiled step, parameters and constants excluded;
- step time: median of the steps after the first.

Tables per (peft, jit_compile, depth): median (min-max) over processes, then
ratios: each process's figure / the forward pass's median (same measure),
/ backprop's median, step time / the forward pass's. With two depths or more,
depth growth between the lowest and highest: (method(hi) - method(lo)) /
(backprop(hi) - backprop(lo)), per memory measure.

The arithmetic floor: a JVP step (``directional_descent``) carries a tangent
beside each live activation, about 2x a forward pass's activation memory;
``spsa``'s two forward passes in inference mode, about 1x.

    python benchmarks/peft_vit.py --repeats 3
    python benchmarks/peft_vit.py --repeats 3 --depths 6 12 --jit-compile true --xla-buffers

Smoke test (a tiny ViT):

    python benchmarks/peft_vit.py --depths 1 2 --image-size 32 --patch-size 8 --hidden-dim 32 --num-heads 2 \\
        --mlp-dim 64 --repeats 1 --steps 3 --xla-buffers
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from importlib.metadata import version

from peft_vit_probe import add_model_arguments

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peft_vit_probe.py")
MODEL_ARGS = ("batch_size", "image_size", "patch_size", "hidden_dim", "num_heads", "mlp_dim", "num_classes")
MEASURES = (("process_peak_bytes", "process"), ("allocator_peak_bytes", "allocator"),
            ("xla_buffer_bytes", "XLA buffers"))
MiB = 2 ** 20


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["forward", "backprop", "directional_descent", "spsa"])
    parser.add_argument("--pefts", nargs="+", choices=["lora", "prompts"], default=["lora", "prompts"])
    parser.add_argument("--depths", nargs="+", type=int, default=[12])
    parser.add_argument("--jit-compile", nargs="+", choices=["true", "false"], default=["true", "false"])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration")
    parser.add_argument("--steps", type=int, default=3, help="steps per process, the first included")
    parser.add_argument("--xla-buffers", action="store_true", help="also read XLA's buffer assignment (XLA runs)")
    add_model_arguments(parser)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per process")
    parser.add_argument("--json-out", help="also write every raw result to this file")
    return parser.parse_args()


def run_probe(args, method, peft, jit_compile, depth):
    """One fresh process's result; a crash, a timeout or a compilation Keras dropped becomes its ``error``."""
    command = [sys.executable, PROBE, "--method", method, "--peft", peft, "--jit-compile", jit_compile,
               "--depth", str(depth), "--steps", str(args.steps)]
    for name in MODEL_ARGS:
        command += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.xla_buffers and jit_compile == "true":
        command.append("--xla-buffers")
    failed = {"method": method, "peft": peft, "depth": depth, "jit_compile": jit_compile == "true"}
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"timeout after {args.timeout:g} s"}
    lines = run.stdout.strip().splitlines()
    if run.returncode or not lines:
        stderr = run.stderr.strip().splitlines()
        return {**failed, "error": f"exit {run.returncode}: {stderr[-1] if stderr else 'no output'}"}
    result = json.loads(lines[-1])
    if result["jit_compile"] != (jit_compile == "true") and "error" not in result:
        result["error"] = f"Keras did not compile with jit_compile={jit_compile}"
    return result


def median(runs, key):
    """Median of ``key`` over the runs that have it, or None."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def spread(runs, key, scale, digits):
    """``median (min-max)`` of ``key`` over ``runs`` divided by ``scale``; ``-`` without a value."""
    values = sorted(r[key] / scale for r in runs if r.get(key) is not None)
    if not values:
        return "-"
    return f"{statistics.median(values):.{digits}f} ({values[0]:.{digits}f}-{values[-1]:.{digits}f})"


def print_table(header, rows):
    """A Markdown table, numbers right-aligned."""
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def ratio(runs, base_runs, key):
    """``median (min-max)`` of ``key`` over ``runs`` / the median of ``base_runs``; ``-`` without both."""
    base = median(base_runs, key)
    return spread(runs, key, base, 2) if base else "-"


def growth(good, method, key, low, high):
    """``method``'s median of ``key`` at depth ``high`` minus at ``low``, or None."""
    values = [median(good.get((depth, method), []), key) for depth in (low, high)]
    return None if None in values else values[1] - values[0]


def print_tables(args, results):
    """The tables of the module docstring, from ``results``: (peft, jit_compile, depth, method) -> [result]."""
    for peft in args.pefts:
        for jit_compile in args.jit_compile:
            xla = args.xla_buffers and jit_compile == "true"
            measures = [m for m in MEASURES if xla or m[0] != "xla_buffer_bytes"]
            good = {(depth, method): [r for r in results[(peft, jit_compile, depth, method)] if "error" not in r]
                    for depth in args.depths for method in args.methods}
            for depth in args.depths:
                cell = {method: good[(depth, method)] for method in args.methods}
                params = next((runs[0] for runs in cell.values() if runs), None)
                counts = params and f": {params['trainable_params']} trainable of {params['total_params']} parameters"
                print(f"\n### {peft}, jit_compile={jit_compile}, depth {depth}{counts or ''}\n")
                print_table(["method"] + [f"{label} MiB" for _, label in measures] + ["step s", "first step s"],
                            [[method] + [spread(runs, key, MiB, 2) for key, _ in measures]
                             + [spread(runs, "step_seconds", 1, 4), spread(runs, "first_step_seconds", 1, 2)]
                             for method, runs in cell.items()])
                bases = [base for base in ("forward", "backprop") if cell.get(base)]
                print()
                print_table(["method"] + [f"{label} / {base}" for base in bases for _, label in measures]
                            + ["step / forward"],
                            [[method] + [ratio(runs, cell[base], key) for base in bases for key, _ in measures]
                             + [ratio(runs, cell.get("forward", []), "step_seconds")]
                             for method, runs in cell.items()])
                for method in args.methods:
                    for r in results[(peft, jit_compile, depth, method)]:
                        if "error" in r:
                            print(f"\n{method} failed: {r['error']}")
            if len(args.depths) > 1:
                low, high = min(args.depths), max(args.depths)
                print(f"\n### {peft}, jit_compile={jit_compile}: growth from depth {low} to {high} / backprop's\n")
                rows = []
                for method in args.methods:
                    row = [method]
                    for key, _ in measures:
                        grown = [growth(good, name, key, low, high) for name in (method, "backprop")]
                        row.append(f"{grown[0] / grown[1]:.2f}" if None not in grown and grown[1] else "-")
                    rows.append(row)
                print_table(["method"] + [label for _, label in measures], rows)


def main():
    args = parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(PROBE)).stdout.strip()
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}, commit {commit or '?'}, keras "
          f"{version('keras')}, tensorflow {version('tensorflow')}, keras_hub {version('keras-hub')}")
    print(f"ViT: depths {args.depths}, images {args.image_size}, patches {args.patch_size}, width {args.hidden_dim}, "
          f"{args.num_heads} heads, MLP {args.mlp_dim}, batch {args.batch_size}, {args.num_classes} classes; "
          f"{args.steps} steps per process, {args.repeats} processes per configuration")
    print("floor: a JVP step ~2x a forward pass's activation memory (a tangent beside each activation); spsa ~1x\n")
    results = {}
    raw = []
    for _ in range(args.repeats):  # interleaved: drift of the machine hits all alike
        for peft in args.pefts:
            for jit_compile in args.jit_compile:
                for depth in args.depths:
                    for method in args.methods:
                        result = run_probe(args, method, peft, jit_compile, depth)
                        print(json.dumps(result), flush=True)
                        results.setdefault((peft, jit_compile, depth, method), []).append(result)
                        raw.append(result)
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(raw, out, indent=1)
    print_tables(args, results)


if __name__ == "__main__":
    main()
