#!/usr/bin/env python3
"""analyze_tuning.py: the tables and plot of the controller tuning (doc/results.md, last section)
from the logs of scripts/tune_controller.sh.

    python3 scripts/analyze_tuning.py [TUNE_DIR ...]     (defaults: out/tune out/tune_long)

Writes doc/tuning_table.md and doc/plots/tuning.png. Reads only the log.csv files the training
program writes. Needs matplotlib (Debian: python3-matplotlib).
"""
import csv
import os
import statistics
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "doc")
PLOTS = os.path.join(DOC, "plots")


def read_log(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    layers = 0
    while f"p_{layers}" in rows[0]:
        layers += 1
    return rows, layers


def col(rows, name):
    return [float(r[name]) for r in rows]


def second_half(values):
    return values[len(values) // 2:]


def settle_step(a, tgt):
    """First step s with a_s within 5% of the target and at least 95% of all steps from s on within
    5% too (None if there is none): a run that oscillates around the target never settles."""
    inside = [abs(x - tgt) <= 0.05 * tgt for x in a]
    remaining = 0
    counts = [0] * (len(a) + 1)  # counts[s]: steps from s on that are inside
    for i in range(len(a) - 1, -1, -1):
        remaining += inside[i]
        counts[i] = remaining
    for i in range(len(a)):
        if inside[i] and counts[i] >= 0.95 * (len(a) - i):
            return i
    return None


# the controller settings drawn boldly in the tuning plot
HIGHLIGHT = {"Kp 0.1, Ki 0.3, p0 0.8": ("tuned default", "tab:green"),
             "Kp 0.3, Ki 0.05, p0 0.5": ("provisional", "tab:red")}


def tune(tune_dir, out, plot=True):
    if not os.path.isdir(tune_dir):
        return
    runs = sorted((d for d in os.listdir(tune_dir) if os.path.isfile(os.path.join(tune_dir, d, "log.csv"))),
                  key=lambda d: (d.split("_")[0] != "tiny", d))
    if not runs:
        return
    out.append(f"## Controller tuning (logs: `{os.path.relpath(tune_dir, ROOT)}`)\n")
    out.append("Settled: the first step whose a_t is within 5% of the target and from which at least 95% of "
               "the steps stay within 5% (— if never); spread: standard deviation of a_t over the second half; lag-1: autocorrelation of "
               "a_t − target over the second half (near −1 means a two-step oscillation, near +1 a slow drift).\n")
    out.append("| size | target | Kp | Ki | p0 | settled at step | of steps | mean a (2nd half) | spread | lag-1 | final p |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    groups = defaultdict(list)
    for name in runs:
        rows, L = read_log(os.path.join(tune_dir, name, "log.csv"))
        size, t, kp, ki, p0 = name.split("_")
        tgt = float(t[1:])
        a = col(rows, "activated")
        half = second_half(a)
        dev = [x - tgt for x in half]
        md = statistics.mean(dev)
        var = sum((d - md) ** 2 for d in dev)
        lag1 = sum((dev[i] - md) * (dev[i + 1] - md) for i in range(len(dev) - 1)) / var if var > 0 else 0.0
        s = settle_step(a, tgt)
        out.append(f"| {size} | {tgt:g} | {kp[2:]} | {ki[2:]} | {p0[2:]} | {s + 1 if s is not None else '—'} | {len(a)} | "
                   f"{statistics.mean(half):.3f} | {statistics.pstdev(half):.3f} | {lag1:+.2f} | {float(rows[-1]['p']):.3f} |")
        oscillates = statistics.pstdev(half) > 0.25 * tgt
        groups[(size, tgt)].append((f"Kp {kp[2:]}, Ki {ki[2:]}, p0 {p0[2:]}", a, oscillates))
    out.append("")
    if not plot:
        return
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for ax, ((size, tgt), curves) in zip(axes.flat, sorted(groups.items())):
        for label, a, oscillates in curves:
            steps = range(1, len(a) + 1)
            if label in HIGHLIGHT:
                ax.plot(steps, a, lw=1.6, color=HIGHLIGHT[label][1], label=HIGHLIGHT[label][0] + ": " + label, zorder=3)
            elif oscillates:  # a_t jumping between 1 and E: drawn faintly so the others stay visible
                ax.plot(steps, a, lw=0.3, color="grey", alpha=0.4)
            else:
                ax.plot(steps, a, lw=0.8, alpha=0.45)
        ax.axhspan(0.95 * tgt, 1.05 * tgt, color="grey", alpha=0.2)
        ax.set_ylim(0.4 * tgt, 1.6 * tgt)
        ax.set_title(f"{size}, target {tgt:g} (thin: other settings; grey: oscillating)", fontsize=9)
        ax.set_ylabel("a_t")
        ax.legend(fontsize=6)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    os.makedirs(PLOTS, exist_ok=True)
    fig.savefig(os.path.join(PLOTS, "tuning.png"), dpi=110)
    plt.close(fig)


def main():
    tune_dirs = sys.argv[1:] or [os.path.join(ROOT, "out", "tune"), os.path.join(ROOT, "out", "tune_long")]
    out = ["# Controller tuning tables", "",
           "Generated by `python3 scripts/analyze_tuning.py` from the logs of `scripts/tune_controller.sh` "
           "(see results.md for the commands and the discussion).", ""]
    for i, tune_dir in enumerate(tune_dirs):
        tune(tune_dir, out, plot=i == 0)
    with open(os.path.join(DOC, "tuning_table.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    print("analyze_tuning: wrote doc/tuning_table.md and doc/plots/tuning.png")


if __name__ == "__main__":
    main()
