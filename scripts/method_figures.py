#!/usr/bin/env python3
"""method_figures.py: the figures and the worked example of doc/method.md, computed, not drawn by hand.

    scripts/method_figures.py [OUTDIR]      (default doc/plots; needs matplotlib: python3-matplotlib)

Writes OUTDIR/method_cutoff.png (one token's router probabilities, sorted, as one cumulative bar with
the cut at p) and OUTDIR/method_controller.png (the controller's feedback loop), and prints the
worked example of doc/method.md (selection, gates, one controller step) as markdown. The selection
follows select_experts of train_dtopp.c: a stable sort by P, then keep an expert while the float32
sum of the probabilities kept before it is below p; the controller step is controller_update_from.
"""
import os
import sys

import numpy as np

# the example: one token's router probabilities over E = 8 experts, and the run's controller
P = np.array([0.05, 0.30, 0.08, 0.22, 0.03, 0.17, 0.10, 0.05], dtype=np.float32)
p = np.float32(0.6)
E, tgt, Kp, Ki, p0, pmin, pmax = 8, 2.0, 0.1, 0.3, 0.8, 0.01, 1.0
I_before, a_before, a_t = -0.65, 2.4, 2.5  # the integral, the previous step's a, this step's a


def select(P, p):
    """select_experts: the experts kept, in selection order, and the mass before each in the order."""
    order = sorted(range(len(P)), key=lambda e: (-P[e], e))  # ties: the lower index first
    kept, before = [], []
    total = np.float32(0.0)
    for e in order:
        before.append(float(total))
        if total >= p:
            break
        kept.append(e)
        total = np.float32(total + P[e])
    return order, kept, before


def controller_step(I, a):
    """controller_update_from for one layer: (p, I) after a step that averaged a experts per token."""
    e = (tgt - a) / E
    integral = I + e
    threshold = p0 + Kp * e + Ki * integral
    if pmin <= threshold <= pmax:
        return threshold, integral, e
    return min(max(threshold, pmin), pmax), I, e


def worked_example():
    order, kept, before = select(P, p)
    mass = sum(float(P[e]) for e in kept)
    lines = ["| expert (by P) | P | mass kept before it | kept? | gate (renormalised) |",
             "| --- | --- | --- | --- | --- |"]
    for i, e in enumerate(order):
        b = f"{before[i]:.2f}" if i < len(before) else "—"
        keep = e in kept
        why = f"yes ({b} < p)" if keep else (f"no ({b} ≥ p)" if i < len(before) else "no (the walk stopped)")
        gate = f"{P[e]:.2f} / {mass:.2f} = {P[e] / mass:.3f}" if keep else "0"
        lines.append(f"| e{e} | {P[e]:.2f} | {b} | {why} | {gate} |")
    p_prev, _, e_prev = controller_step(I_before - (tgt - a_before) / E, a_before)
    p_new, I_new, e_t = controller_step(I_before, a_t)
    print(f"p = {p:g}: S = {{{', '.join(f'e{e}' for e in kept)}}}, |S| = {len(kept)}, mass {mass:.2f}\n")
    print("\n".join(lines))
    print(f"\ncontroller (E = {E}, tgt = {tgt:g}, Kp = {Kp}, Ki = {Ki}, p0 = {p0}): before the step p = "
          f"{p_prev:.4f}, I = {I_before}; the step averaged a_t = {a_t}:")
    print(f"    e_t = ({tgt:g} − {a_t}) / {E} = {e_t:.4f}")
    print(f"    I'  = {I_before} + ({e_t:.4f}) = {I_before + e_t:.4f}")
    print(f"    p'  = {p0} + {Kp}·({e_t:.4f}) + {Ki}·({I_before + e_t:.4f}) = {p_new:.4f}   in [{pmin}, {pmax}]: "
          f"p = {p_new:.4f}, I = {I_new:.4f}")
    _, kept_next, _ = select(P, np.float32(p_new))
    print(f"next step, the same token: |S| = {len(kept_next)}")
    return order, kept, before


def cutoff_figure(path, order, kept):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 2.4))
    left = 0.0
    for e in order:
        keep = e in kept
        ax.barh(0, P[e], left=left, height=0.5, color="C0" if keep else "0.82", edgecolor="white")
        ax.text(left + P[e] / 2, 0, f"e{e}\n{P[e]:.2f}", ha="center", va="center", fontsize=9,
                color="white" if keep else "black")
        left += float(P[e])
    ax.axvline(float(p), color="C3", lw=2)
    ax.text(float(p), 0.36, f"p = {p:g}", color="C3", ha="center", fontsize=10)
    last = kept[-1]
    before_last = sum(float(P[e]) for e in kept[:-1])
    ax.annotate(f"mass before e{last}: {before_last:.2f} < p, so e{last} is kept\n"
                f"and carries the sum past p; the rest are dropped",
                xy=(before_last + float(P[last]) / 2, -0.25), xytext=(0.72, -0.62), fontsize=9,
                arrowprops=dict(arrowstyle="->", color="0.3"))
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.8, 0.55)
    ax.set_yticks([])
    ax.set_xlabel("cumulative router probability, experts sorted by P")
    ax.set_title(f"one token, E = 8: top-p keeps {len(kept)} experts (blue)", fontsize=11)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def controller_figure(path):
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 4)
    ax.axis("off")

    def box(x, y, w, h, text, color):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.08", fc=color, ec="0.3"))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)

    def arrow(x0, y0, x1, y1, label="", dx=0.0, dy=0.15):
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", lw=1.5, color="0.2"))
        if label:
            ax.text((x0 + x1) / 2 + dx, (y0 + y1) / 2 + dy, label, ha="center", fontsize=9)

    box(0.3, 2.4, 2.6, 1.1, "PI controller\np = p0 + Kp·e_t + Ki·I\n(I += e_t unless p clamps)", "#dbe9f6")
    box(4.0, 2.4, 2.6, 1.1, "the model's step\nevery token, every layer:\nkeep experts by P until\ntheir mass reaches p", "#e6f2df")
    box(7.4, 2.4, 2.3, 1.1, "measure\na_t = mean |S| over\nthe step's tokens, layers", "#f6ecd9")
    box(4.0, 0.4, 2.6, 1.0, "compare with the budget\ne_t = (tgt − a_t) / E", "#f4dcdc")
    arrow(2.9, 2.95, 4.0, 2.95, "p (next step)")
    arrow(6.6, 2.95, 7.4, 2.95, "|S| per token")
    arrow(8.55, 2.4, 6.6, 0.9, "a_t", dx=0.5, dy=0.0)
    arrow(4.0, 0.9, 1.6, 2.4, "e_t", dx=-0.45, dy=0.0)
    ax.text(5.3, 1.65, "tgt", ha="center", fontsize=9)
    arrow(5.3, 1.6, 5.3, 1.45)
    ax.text(5.0, 3.8, "once per optimizer step: too many experts (a_t > tgt) lowers p, too few raises it",
            ha="center", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "doc/plots"
    order, kept, _ = worked_example()
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        sys.exit("method_figures: matplotlib is not installed, so no figures (Debian: apt-get install "
                 "python3-matplotlib)")
    os.makedirs(out, exist_ok=True)
    cutoff_figure(os.path.join(out, "method_cutoff.png"), order, kept)
    controller_figure(os.path.join(out, "method_controller.png"))
    print(f"\nwrote {out}/method_cutoff.png, {out}/method_controller.png")


if __name__ == "__main__":
    main()
