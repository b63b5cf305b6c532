#!/usr/bin/python3
"""dit_plots.py OUTDIR [PLOTDIR]: the plots and tables of doc/dit.md from scripts/dit_compare.sh OUTDIR.

Reads OUTDIR/ROUTING_sSEED/train.log (validation loss during training) and routing.csv (eval_dit
routing: tokens and activated experts summed by layer, t, class, patch and region) of the DTop-p
runs, and writes into PLOTDIR (default doc/plots):
  dit_compare_loss.png       validation loss during training, every run
  dit_routing_time.png       activated experts per patch token against the noise level t, per layer
  dit_routing_class.png      activated experts of the garment patches of each class, per layer
  dit_routing_position.png   activated experts of each patch position (7 x 7), per layer, and
                             the share of test images whose patch there is garment
It prints the tables of doc/dit.md (markdown): experts by layer and region, by layer and t.
Needs numpy and matplotlib (Debian: python3-numpy python3-matplotlib).
"""
import csv
import glob
import os
import sys

import numpy as np
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]


def read_routing(path):
    """Tokens and experts as arrays indexed [layer, t level, class, patch, region (0 background, 1 garment)]."""
    rows = list(csv.DictReader(open(path)))
    layers = 1 + max(int(r["layer"]) for r in rows)
    times = sorted({float(r["t"]) for r in rows})
    patches = 1 + max(int(r["patch"]) for r in rows)
    tokens = np.zeros((layers, len(times), len(CLASSES), patches, 2))
    experts = np.zeros_like(tokens)
    for r in rows:
        index = (int(r["layer"]), times.index(float(r["t"])), int(r["class"]), int(r["patch"]),
                 1 if r["region"] == "garment" else 0)
        tokens[index] += int(r["tokens"])
        experts[index] += int(r["experts"])
    return np.array(times), tokens, experts


def mean_over(tokens, experts, keep):
    """Experts per token, summing over every axis but those in `keep`."""
    axes = tuple(a for a in range(tokens.ndim) if a not in keep)
    return experts.sum(axis=axes) / np.maximum(tokens.sum(axis=axes), 1)


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out = sys.argv[1]
    plots = sys.argv[2] if len(sys.argv) == 3 else "doc/plots"
    os.makedirs(plots, exist_ok=True)

    # validation loss during training
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in sorted(glob.glob(os.path.join(out, "*_s*"))):
        if not os.path.isdir(run):
            continue
        steps, val = [], []  # "step N | validation loss MEAN (...)", the last one after training
        for line in open(os.path.join(run, "train.log")):
            words = line.split()
            if len(words) > 5 and words[0] == "step" and words[3:5] == ["validation", "loss"]:
                steps.append(int(words[1]))
                val.append(float(words[5]))
        name = os.path.basename(run)
        ax.plot(steps[1:], val[1:], marker="o", markersize=3, label=name,
                color="C0" if name.startswith("dtopp") else "C3", linestyle="-" if name.endswith("1337") else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (mean of t = 0.25, 0.5, 0.75)")
    ax.set_title("DTop-p (target 2) against Top-2, 8 experts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(plots, "dit_compare_loss.png"), dpi=110)

    runs = sorted(glob.glob(os.path.join(out, "dtopp_s*", "routing.csv")))
    if not runs:
        sys.exit(f"dit_plots: no {out}/dtopp_s*/routing.csv (scripts/dit_compare.sh {out})")
    data = [read_routing(path) for path in runs]
    times = data[0][0]
    tokens = sum(d[1] for d in data)  # the seeds pooled: every run routed the same images and noise
    experts = sum(d[2] for d in data)
    L = tokens.shape[0]
    grid = int(round(tokens.shape[3] ** 0.5))
    names = ", ".join(os.path.basename(os.path.dirname(p)) for p in runs)

    fig, ax = plt.subplots(figsize=(8.5, 4))
    for l in range(L):
        ax.plot(times, mean_over(tokens[l], experts[l], (0,)), marker="o", label=f"layer {l}")
    ax.plot(times, mean_over(tokens, experts, (1,)), color="black", linewidth=2, label="all layers")
    for region, style in ((1, "--"), (0, ":")):
        ax.plot(times, mean_over(tokens[..., region], experts[..., region], (1,)), color="black", linestyle=style,
                label=f"all layers, {'garment' if region else 'background'} patches")
    ax.set_xlabel("noise level t (0: clean image, 1: pure noise)")
    ax.set_ylabel("activated experts per patch token")
    ax.set_title(f"DTop-p DiT, budget 2 of 8 ({names})", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(os.path.join(plots, "dit_routing_time.png"), dpi=110)

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / L
    for l in range(L):
        garment = mean_over(tokens[l, ..., 1], experts[l, ..., 1], (1,))
        ax.bar(np.arange(len(CLASSES)) + (l - (L - 1) / 2) * width, garment, width, label=f"layer {l}")
    ax.set_xticks(np.arange(len(CLASSES)))
    ax.set_xticklabels(CLASSES, rotation=30, fontsize=8)
    ax.set_ylabel("activated experts per patch token")
    ax.set_title("by class: the garment patches of each class (all noise levels)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(plots, "dit_routing_class.png"), dpi=110)

    fig, axes = plt.subplots(1, L + 1, figsize=(2.6 * (L + 1), 2.9))
    for l in range(L):
        m = mean_over(tokens[l], experts[l], (2,)).reshape(grid, grid)
        image = axes[l].imshow(m, cmap="viridis")
        axes[l].set_title(f"layer {l}: {m.min():.2f} to {m.max():.2f}", fontsize=8)
        fig.colorbar(image, ax=axes[l], fraction=0.046)
    garment_share = tokens[0, 0, :, :, 1].sum(axis=0) / tokens[0, 0].sum(axis=(0, 2))
    image = axes[L].imshow(garment_share.reshape(grid, grid), cmap="gray", vmin=0, vmax=1)
    axes[L].set_title("share of images with\ngarment in the patch", fontsize=8)
    fig.colorbar(image, ax=axes[L], fraction=0.046)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle("activated experts per patch position (all noise levels and classes)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(plots, "dit_routing_position.png"), dpi=110)

    # tables
    print(f"runs: {names}; {int(tokens[0].sum())} tokens per layer\n")
    print("| layer | all | background | garment | garment − background | t = %.2f | t = %.2f | "
          "classes, garment patches: highest − lowest |" % (times[0], times[-1]))
    print("|---|---|---|---|---|---|---|---|")
    for l in list(range(L)) + [None]:
        t_, e_ = (tokens, experts) if l is None else (tokens[l:l + 1], experts[l:l + 1])
        region = mean_over(t_, e_, (4,))
        by_time = mean_over(t_, e_, (1,))
        by_class = mean_over(t_[..., 1], e_[..., 1], (2,))
        print(f"| {'all' if l is None else l} | {mean_over(t_, e_, ()):.3f} | {region[0]:.3f} | {region[1]:.3f} | "
              f"{region[1] - region[0]:+.3f} | {by_time[0]:.3f} | {by_time[-1]:.3f} | "
              f"{by_class.max() - by_class.min():.3f} ({CLASSES[by_class.argmax()]} − {CLASSES[by_class.argmin()]}) |")
    print("\nby noise level, every layer: all patches, background, garment")
    for i, t in enumerate(times):
        region = mean_over(tokens[:, i], experts[:, i], (3,))
        print(f"  t = {t:.2f}: {mean_over(tokens[:, i], experts[:, i], ()):.3f}, {region[0]:.3f}, {region[1]:.3f}")
    print("\nper run (seed), every layer: background, garment; t lowest, highest")
    noise, patch = [], []  # per run: experts at the highest t − the lowest; garment − background
    for path, (_, tk, ex) in zip(runs, data):
        region = mean_over(tk, ex, (4,))
        by_time = mean_over(tk, ex, (1,))
        print(f"  {os.path.basename(os.path.dirname(path))}: {region[0]:.3f}, {region[1]:.3f}; "
              f"{by_time[0]:.3f}, {by_time[-1]:.3f}")
        noise.append(by_time[-1] - by_time[0])
        patch.append(region[1] - region[0])
    # the rules of doc/dit.md ("Second round")
    same_sign = all(x > 0 for x in noise) or all(x < 0 for x in noise)
    v = ("reproduced" if same_sign and min(abs(x) for x in noise) >= 0.1 else
         "contradicted" if max(abs(x) for x in noise) < 0.05 else "not decided")
    print(f"\nexperts by noise level, t = {times[-1]:.2f} − t = {times[0]:.2f} per run: "
          f"{', '.join(f'{x:+.3f}' for x in noise)}: {v}")
    v = "reproduced" if min(patch) >= 0.1 else "contradicted" if max(patch) <= -0.1 else "not decided"
    print(f"experts by patch, garment − background per run: {', '.join(f'{x:+.3f}' for x in patch)}: {v}")


if __name__ == "__main__":
    main()
