#!/usr/bin/env python3
"""analyze.py: tables and plots of doc/results.md from the logs of scripts/repro.sh and
scripts/tune_controller.sh.

    python3 scripts/analyze.py [REPRO_DIR [TUNE_DIR ...]]     (defaults: out/repro, out/tune out/tune_long)

Writes doc/results_table.md (every number of the results, as Markdown tables) and doc/plots/*.png.
Reads only the CSV files the training program writes (log.csv: one row per step, see its header;
routing.csv: one row per validation token of the last evaluation). Needs matplotlib (Debian:
python3-matplotlib).
"""
import csv
import math
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

# method -> (label, colour), in the order of the tables
METHODS = {
    "topk": ("Top-k (k = target)", "tab:blue"),
    "topp_low": ("fixed Top-p, low p", "tab:orange"),
    "topp_high": ("fixed Top-p, high p", "tab:red"),
    "dtopp": ("DTop-p (PI + DRN)", "tab:green"),
    "pi_only": ("PI controller, no DRN", "tab:olive"),
    "drn_only": ("DRN, fixed p", "tab:purple"),
    "dtopp_layer": ("DTop-p, per-layer p", "tab:cyan"),
}


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


def run_summary(rows, L):
    """Everything the results table reports about one run."""
    steps = [int(r["step"]) for r in rows]
    a = col(rows, "activated")
    half = second_half(rows)
    a_half = [float(r["activated"]) for r in half]
    # token-level sigma of |S|: per step, the mean over layers of each layer's population std
    sigma_tok = [statistics.mean(float(r[f"std_{l}"]) for l in range(L)) for r in half]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    per_layer = [statistics.mean(float(r[f"mean_{l}"]) for r in half) for l in range(L)]
    per_layer_sd = [statistics.mean(float(r[f"std_{l}"]) for r in half) for l in range(L)]
    theta = [float(rows[-1][f"theta_{l}"]) for l in range(L)]
    return {
        "steps": steps,
        "a": a,
        "p": col(rows, "p"),
        "p_layers": [col(rows, f"p_{l}") for l in range(L)],
        "sigma_tok": [statistics.mean(float(r[f"std_{l}"]) for l in range(L)) for r in rows],
        "val": val,
        "final_val": val[-1][1] if val else float("nan"),
        "a_mean": statistics.mean(a_half),
        "a_start": statistics.mean(a[:max(1, len(a) // 10)]),
        "a_step_sd": statistics.pstdev(a_half),
        "a_token_sd": statistics.mean(sigma_tok),
        "per_layer": per_layer,
        "per_layer_sd": per_layer_sd,
        "theta": theta,
        "compute": statistics.mean(a),  # expert passes per token, averaged over the whole run
        "p_final": float(rows[-1]["p"]),
    }


def method_of(run):
    return run.rsplit("_s", 1)[0]


def fmt(x, digits=3):
    return f"{x:.{digits}f}"


def repro(repro_dir, out):
    if not os.path.isdir(repro_dir):
        return
    runs = {}
    for name in sorted(os.listdir(repro_dir)):
        path = os.path.join(repro_dir, name, "log.csv")
        if os.path.isfile(path):
            rows, L = read_log(path)
            runs[name] = (run_summary(rows, L), L)
    if not runs:
        print(f"analyze: no runs in {repro_dir}", file=sys.stderr)
        return
    by_method = defaultdict(list)
    for name, (s, L) in runs.items():
        by_method[method_of(name)].append((name, s))
    L = next(iter(runs.values()))[1]

    out.append(f"## Methods (logs: `{os.path.relpath(repro_dir, ROOT)}`)\n")
    out.append("Final validation loss (CE, nats per byte) as mean ± half the range over seeds; activated experts "
               "per token a over the first 10% of training and over the second half, its standard deviation across steps and "
               "across tokens (σ of |S|, averaged over layers), the compute actually spent (mean a over the whole "
               "run, in expert passes per token per layer), and the final p.\n")
    out.append("| method | seeds | val loss | a (first 10%) | a (2nd half) | σ across steps | σ across tokens | compute | final p |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method, (label, _) in METHODS.items():
        if method not in by_method:
            continue
        ss = [s for _, s in by_method[method]]
        vals = [s["final_val"] for s in ss]
        spread = (max(vals) - min(vals)) / 2
        mean = lambda k: statistics.mean(s[k] for s in ss)  # noqa: E731
        out.append(f"| {label} | {len(ss)} | {fmt(statistics.mean(vals))} ± {fmt(spread)} | {fmt(mean('a_start'), 2)} | {fmt(mean('a_mean'), 2)} | "
                   f"{fmt(mean('a_step_sd'), 3)} | {fmt(mean('a_token_sd'), 2)} | {fmt(mean('compute'), 2)} | "
                   f"{fmt(mean('p_final'), 3)} |")
    out.append("")
    out.append("Per layer, second half of training: mean |S| ± σ across tokens, and the final DRN scale θ "
               "(θ stays at its initial value without DRN).\n")
    out.append("| method | " + " | ".join(f"layer {l}" for l in range(L)) + " | θ per layer |")
    out.append("| --- | " + " | ".join("---" for _ in range(L)) + " | --- |")
    for method, (label, _) in METHODS.items():
        if method not in by_method:
            continue
        s = by_method[method][0][1]
        cells = [f"{s['per_layer'][l]:.2f} ± {s['per_layer_sd'][l]:.2f}" for l in range(L)]
        out.append(f"| {label} | " + " | ".join(cells) + " | " + ", ".join(f"{t:.2f}" for t in s["theta"]) + " |")
    out.append("")

    os.makedirs(PLOTS, exist_ok=True)
    # validation loss
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, (label, colour) in METHODS.items():
        for i, (name, s) in enumerate(by_method.get(method, [])):
            xs, ys = zip(*s["val"])
            ax.plot(xs, ys, color=colour, label=label if i == 0 else None, alpha=0.9 if i == 0 else 0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_ylim(1.6, 2.4)  # the start (5.5) would flatten the part where the methods differ
    ax.legend(fontsize=8)
    ax.set_title("Validation loss, same tokens for every method")
    fig.tight_layout()
    fig.savefig(os.path.join(PLOTS, "val_loss.png"), dpi=110)
    plt.close(fig)

    # activated experts with a band of ± σ across tokens
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, (label, colour) in METHODS.items():
        if method not in by_method:
            continue
        s = by_method[method][0][1]
        lo = [a - sd for a, sd in zip(s["a"], s["sigma_tok"])]
        hi = [a + sd for a, sd in zip(s["a"], s["sigma_tok"])]
        ax.plot(s["steps"], s["a"], color=colour, label=label, lw=1.2)
        ax.fill_between(s["steps"], lo, hi, color=colour, alpha=0.12)
    ax.set_xlabel("step")
    ax.set_ylabel("activated experts per token (band: ± σ across tokens)")
    ax.legend(fontsize=8)
    ax.set_title("Activated experts over training")
    fig.tight_layout()
    fig.savefig(os.path.join(PLOTS, "activated.png"), dpi=110)
    plt.close(fig)

    # per-layer activated experts
    fig, ax = plt.subplots(figsize=(7, 4.2))
    present = [m for m in METHODS if m in by_method]
    width = 0.8 / len(present)
    for i, method in enumerate(present):
        label, colour = METHODS[method]
        s = by_method[method][0][1]
        xs = [l + (i - len(present) / 2 + 0.5) * width for l in range(L)]
        ax.bar(xs, s["per_layer"], width, yerr=s["per_layer_sd"], color=colour, label=label, capsize=2)
    ax.set_xticks(range(L))
    ax.set_xticklabels([f"layer {l}" for l in range(L)])
    ax.set_ylabel("activated experts (2nd half; bar: ± σ across tokens)")
    ax.legend(fontsize=7)
    ax.set_title("Activated experts per layer")
    fig.tight_layout()
    fig.savefig(os.path.join(PLOTS, "per_layer.png"), dpi=110)
    plt.close(fig)

    # p over training
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, (label, colour) in METHODS.items():
        if method not in by_method or method == "topk":
            continue
        s = by_method[method][0][1]
        if method == "dtopp_layer":
            for l, pl in enumerate(s["p_layers"]):
                ax.plot(s["steps"], pl, color=colour, lw=1, alpha=0.4 + 0.6 * l / max(1, L - 1),
                        label=f"{label}, layer {l}")
        else:
            ax.plot(s["steps"], s["p"], color=colour, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("threshold p")
    ax.legend(fontsize=7)
    ax.set_title("The threshold p over training")
    fig.tight_layout()
    fig.savefig(os.path.join(PLOTS, "threshold.png"), dpi=110)
    plt.close(fig)

    adaptivity(os.path.join(repro_dir, "dtopp_s1", "routing.csv"), out)


def printable(byte):
    c = chr(byte)
    return {"\n": "\\n", " ": "space", "|": "\\|"}.get(c, c if 32 < byte < 127 else f"0x{byte:02x}")


def adaptivity(path, out):
    """Which tokens get many experts and which few, under DTop-p: by the token, by its loss, by position."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = list(csv.DictReader(f))
    L = sum(1 for k in rows[0] if k.startswith("experts_"))
    tokens = [(int(r["token"]), int(r["position"]), float(r["loss"]),
               statistics.mean(int(r[f"experts_{l}"]) for l in range(L)), [int(r[f"experts_{l}"]) for l in range(L)])
              for r in rows]
    n = len(tokens)
    out.append(f"## Adaptivity under DTop-p (`{os.path.relpath(path, ROOT)}`: {n} validation tokens)\n")
    # by loss decile
    by_loss = sorted(tokens, key=lambda t: t[2])
    deciles = []
    for d in range(10):
        part = by_loss[d * n // 10:(d + 1) * n // 10]
        deciles.append((statistics.mean(t[2] for t in part), statistics.mean(t[3] for t in part),
                        [statistics.mean(t[4][l] for t in part) for l in range(L)]))
    losses = [t[2] for t in tokens]
    experts = [t[3] for t in tokens]
    mx, my = statistics.mean(losses), statistics.mean(experts)
    cov = sum((x - mx) * (y - my) for x, y in zip(losses, experts)) / n
    corr = cov / (statistics.pstdev(losses) * statistics.pstdev(experts))
    out.append(f"Correlation between a token's loss (predicting the next byte) and its number of experts "
               f"(mean over layers): **{corr:+.3f}**. By loss decile:\n")
    out.append("| loss decile | mean loss | mean \\|S\\| | " + " | ".join(f"layer {l}" for l in range(L)) + " |")
    out.append("| --- | --- | --- | " + " | ".join("---" for _ in range(L)) + " |")
    for d, (lo, e, pl) in enumerate(deciles):
        out.append(f"| {d + 1} | {lo:.2f} | {e:.2f} | " + " | ".join(f"{x:.2f}" for x in pl) + " |")
    out.append("")
    # by token
    per_token = defaultdict(list)
    for t in tokens:
        per_token[t[0]].append(t)
    common = [(tok, ts) for tok, ts in per_token.items() if len(ts) >= 30]
    ranked = sorted(common, key=lambda kv: statistics.mean(t[3] for t in kv[1]))
    out.append("Tokens (bytes seen at least 30 times) with the fewest and the most experts, with their mean loss:\n")
    out.append("| fewest | \\|S\\| | loss | count || most | \\|S\\| | loss | count |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (lt, lts), (ht, hts) in zip(ranked[:8], reversed(ranked[-8:])):
        out.append(f"| `{printable(lt)}` | {statistics.mean(t[3] for t in lts):.2f} | {statistics.mean(t[2] for t in lts):.2f} | "
                   f"{len(lts)} || `{printable(ht)}` | {statistics.mean(t[3] for t in hts):.2f} | "
                   f"{statistics.mean(t[2] for t in hts):.2f} | {len(hts)} |")
    out.append("")
    # by position
    T = max(t[1] for t in tokens) + 1
    by_pos = [statistics.mean(t[3] for t in tokens if t[1] == p) for p in range(T)]
    out.append(f"By position in the sequence: |S| = {by_pos[0]:.2f} at position 0, "
               f"{statistics.mean(by_pos[1:8]):.2f} over positions 1-7, {statistics.mean(by_pos[T // 2:]):.2f} over "
               f"positions {T // 2}-{T - 1}.\n")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = [lo for lo, _, _ in deciles]
    axes[0].plot(xs, [e for _, e, _ in deciles], "o-", color="black", label="mean over layers")
    for l in range(L):
        axes[0].plot(xs, [pl[l] for _, _, pl in deciles], ".--", alpha=0.7, label=f"layer {l}")
    axes[0].set_xlabel("token loss (mean of each decile)")
    axes[0].set_ylabel("activated experts")
    axes[0].set_title(f"Harder tokens, more experts? (r = {corr:+.2f})")
    axes[0].legend(fontsize=7)
    axes[1].plot(range(T), by_pos, color="tab:green")
    axes[1].set_xlabel("position in the sequence")
    axes[1].set_ylabel("activated experts (mean over layers)")
    axes[1].set_ylim(0, 2 * max(by_pos))
    axes[1].set_title("Experts by position")
    fig.tight_layout()
    fig.savefig(os.path.join(PLOTS, "adaptivity.png"), dpi=110)
    plt.close(fig)


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
    repro_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "out", "repro")
    tune_dirs = sys.argv[2:] if len(sys.argv) > 2 else [os.path.join(ROOT, "out", "tune"), os.path.join(ROOT, "out", "tune_long")]
    out = ["# Results tables", "",
           "Generated by `python3 scripts/analyze.py` from the logs of `scripts/repro.sh` and "
           "`scripts/tune_controller.sh` (see results.md for the commands and the discussion).", ""]
    for i, tune_dir in enumerate(tune_dirs):
        tune(tune_dir, out, plot=i == 0)
    repro(repro_dir, out)
    with open(os.path.join(DOC, "results_table.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"analyze: wrote doc/results_table.md and doc/plots/*.png")


if __name__ == "__main__":
    main()
