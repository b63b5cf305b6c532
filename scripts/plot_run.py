#!/usr/bin/env python3
"""plot_run.py: a picture of one run from its log.csv, for `make plot OUT=dir`.

    scripts/plot_run.py OUT [--output FILE.png]

OUT is a run's output folder (train_dtopp's or dit/train_dit's) or its log.csv. The picture, by default
OUT/log.png, has four panels: the training loss (a moving average over 2% of the run) with the
validation loss; the threshold p of every layer; the activated experts per token of every layer and
their mean a_t against the budget (the target of dtopp, k of topk, read from OUT/model.bin); and the
speed. A language model's losses are cross-entropies in nats per token; a DiT's (whose log has `mse`
and `images_per_s`) are the mean squared error of its velocity. A summary of the last steps is printed
in any case; without matplotlib (Debian: python3-matplotlib) it says so and exits with status 1.
"""
import argparse
import csv
import os
import struct
import sys


def read_log(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "step" not in rows[0]:
        sys.exit(f"plot_run: {path} is not a training log (no header with a step column)")
    names = rows[0]
    columns = {name: [] for name in names}
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(names):  # a row cut off by an interruption
            print(f"plot_run: {path}, line {number}: {len(row)} values for {len(names)} columns, left out")
            continue
        for name, value in zip(names, row):
            columns[name].append(float(value) if value != "" else None)
    if not columns["step"]:
        sys.exit(f"plot_run: {path} has no steps yet")
    return columns


def read_budget(model_path):
    """(routing name, budget) from a model file's header (doc/formats.md), or (None, None)."""
    try:
        with open(model_path, "rb") as f:
            header = f.read(1024)
    except OSError:
        return None, None
    if len(header) < 1024:
        return None, None
    magic, routing, k = (struct.unpack_from("<i", header, 4 * w)[0] for w in (0, 10, 14))
    tgt = struct.unpack_from("<f", header, 4 * 32)[0]
    if magic not in (20251213, 20251217):  # a language model, a DiT
        return None, None
    return {0: ("topk", float(k)), 1: ("topp", None), 2: ("dtopp", tgt)}.get(routing, (None, None))


def smooth(values, window):
    out, total, kept = [], 0.0, []
    for v in values:
        kept.append(v)
        total += v
        if len(kept) > window:
            total -= kept.pop(0)
        out.append(total / len(kept))
    return out


def layers_of(columns, prefix):
    layers = []
    while f"{prefix}_{len(layers)}" in columns:
        layers.append(columns[f"{prefix}_{len(layers)}"])
    return layers


def summary(columns, dit, routing, budget):
    last = len(columns["step"]) - 1
    loss = "mse" if dit else "ce_loss"
    val = [(s, v) for s, v in zip(columns["step"], columns["val_loss"]) if v is not None]
    print(f"steps: {int(columns['step'][last])}; last {loss} {columns[loss][last]:.4f}", end="")
    print(f"; validation loss {val[-1][1]:.4f} at step {int(val[-1][0])}" if val else "; no validation yet")
    means = [layer[last] for layer in layers_of(columns, "mean")]
    print(f"p {columns['p'][last]:.3f}; activated experts {columns['activated'][last]:.2f}"
          + (f" (budget {budget:g}, {routing})" if budget else "")
          + "; per layer " + " ".join(f"{m:.2f}" for m in means))


def main():
    parser = argparse.ArgumentParser(description="a picture of one run from its log.csv")
    parser.add_argument("run", help="the run's output folder, or its log.csv")
    parser.add_argument("--output", help="the PNG to write (default: log.png next to log.csv)")
    args = parser.parse_args()
    log_path = args.run if args.run.endswith(".csv") else os.path.join(args.run, "log.csv")
    if not os.path.exists(log_path):
        sys.exit(f"plot_run: {log_path} does not exist (make plot OUT=dir names a run's folder)")
    folder = os.path.dirname(log_path) or "."
    output = args.output or os.path.join(folder, "log.png")
    columns = read_log(log_path)
    dit = "mse" in columns
    routing, budget = read_budget(os.path.join(folder, "model.bin"))
    summary(columns, dit, routing, budget)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_run: matplotlib is not installed, so no picture (Debian: apt-get install python3-matplotlib; "
              "or pip install matplotlib)")
        sys.exit(1)

    steps = columns["step"]
    window = max(1, len(steps) // 50)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    loss = "mse" if dit else "ce_loss"
    ax.plot(steps, smooth(columns[loss], window), lw=1, label="training" + (" (MSE)" if dit else ""))
    val = [(s, v) for s, v in zip(steps, columns["val_loss"]) if v is not None]
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", ms=3, label="validation")
    ax.set_ylabel("velocity MSE" if dit else "cross-entropy (nats per token)")
    ax.set_title("loss")
    ax.legend()

    ax = axes[0][1]
    ps = layers_of(columns, "p")
    if ps and any(p != ps[0] for p in ps[1:]):  # one threshold per layer
        for l, p in enumerate(ps):
            ax.plot(steps, p, lw=1, label=f"layer {l}")
        ax.legend(fontsize=8)
    else:
        ax.plot(steps, columns["p"], lw=1, color="C2")
    ax.set_title("threshold p" + (" (unused by topk)" if routing == "topk" else ""))

    ax = axes[1][0]
    for l, mean in enumerate(layers_of(columns, "mean")):
        ax.plot(steps, smooth(mean, window), lw=1, label=f"layer {l}")
    ax.plot(steps, smooth(columns["activated"], window), lw=2, color="black", label="a_t, all layers")
    if budget:
        ax.axhline(budget, ls="--", color="red", lw=1, label=f"budget {budget:g} ({routing})")
    ax.set_title("activated experts per token")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    speed = "images_per_s" if dit else "tokens_per_s"
    ax.plot(steps, columns[speed], lw=0.5, color="gray")
    ax.set_title(speed.replace("_", " "))
    ax.set_xlabel("step")

    fig.suptitle(f"{log_path}: {int(steps[-1])} steps" + (f", {routing}" if routing else ""))
    fig.tight_layout()
    fig.savefig(output, dpi=90)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
