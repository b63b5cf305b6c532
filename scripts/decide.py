#!/usr/bin/env python3
"""decide.py: applies the decision rules of doc/results.md to the logs of scripts/repro.sh, and
writes the tables (doc/results_table.md) and plots (doc/plots/repro_*.png) of its results.

    python3 scripts/decide.py [REPRO_DIR [TRAIN_SHARD]]     (defaults: out/repro, data/words_train.bin)

Reads only what the training program writes (log.csv: one row per step; routing.csv: one row per
validation token of the last evaluation, with its loss and its experts in every layer) and the
training shard (for token frequencies). Needs numpy and matplotlib (Debian: python3-numpy,
python3-matplotlib).
"""
import math
import os
import sys

import numpy as np
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analyze_tuning import read_log  # noqa: E402  (same folder: one reader of log.csv)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "doc")
PLOTS = os.path.join(DOC, "plots")

# (granularity, method) -> label; the runs are named e{E}_{method}_s{seed} by repro.sh
METHODS = {
    "dtopp": "DTop-p (PI + DRN)",
    "topk": "Top-k",
    "topp": "fixed Top-p at DTop-p's settled p",
    "pi_only": "PI controller, no DRN",
    "drn_only": "DRN, fixed p",
    "dtopp_layer": "DTop-p, one p per layer",
    # added after the results were in (not a decision rule): with one expert and renormalised
    # gates, a token's gate is 1 whatever the router says, so Top-1 trains its router only
    # through the load-balance loss; these runs give Top-1 its router gradient back
    "topk_raw": "Top-k, gates not renormalised (added after the results)",
}
# the second round's runs at E = 16 (doc/results.md, "Second round"; E = 64 uses the names above)
METHODS_2 = {
    "dtopp_l0topk": "DTop-p, layer 0 on a fixed Top-2",
    "dtopp_ep3": "DTop-p, three epochs",
    "topk_ep3": "Top-k, three epochs",
}
TARGET = {8: 1, 16: 2, 32: 4, 64: 8}
# two-sided 95% quantiles of Student's t, by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def read_run(out, name):
    """Everything the tables use about one run, or None if it has not finished."""
    log = os.path.join(out, name, "log.csv")
    dump = os.path.join(out, name, "routing.csv")
    if not os.path.exists(dump) or os.path.getsize(dump) == 0:  # written at the last validation only
        return None
    rows, L = read_log(log)
    half = rows[len(rows) // 2:]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"] != ""]
    hist = []  # per layer, activated experts per token over training steps
    for l in range(L):
        ks = [k for k in range(0, 65) if f"hist_{l}_{k}" in rows[0]]
        a = [sum(k * float(r[f"hist_{l}_{k}"]) for k in ks) / max(1e-9, sum(float(r[f"hist_{l}_{k}"]) for k in ks))
             for r in rows]
        hist.append(a)
    routing = np.genfromtxt(dump, delimiter=",", skip_header=1)
    return {
        "steps": [int(r["step"]) for r in rows],
        "activated": [float(r["activated"]) for r in rows],
        "p": [float(r["p"]) for r in rows],
        "a_half": float(np.mean([float(r["activated"]) for r in half])),
        "p_half": float(np.mean([float(r["p_0"]) for r in half])),
        "p_layers_half": [float(np.mean([float(r[f"p_{l}"]) for r in half])) for l in range(L)],
        "val": val,
        "final": val[-1][1],
        "layer_a_train": hist,
        "tokens": routing[:, 0].astype(int),
        "loss": routing[:, 2],
        "experts": routing[:, 3:],
    }


def mean_sd(xs):
    m = float(np.mean(xs))
    return m, float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def interval(d):
    """Paired differences over seeds: mean, standard deviation, half-width of the 95% interval."""
    m, s = mean_sd(d)
    n = len(d)
    return m, s, T95.get(n - 1, 1.96) * s / math.sqrt(n) if n > 1 else float("inf")


def paired(a, b):
    """b - a over seeds: mean, standard deviation, half-width of the 95% interval."""
    return interval([y - x for x, y in zip(a, b)])


def verdict(m, hw, above, below, neither="not decided"):
    return above if m - hw > 0 else below if m + hw < 0 else neither


def ranks(x):
    """Ranks with ties averaged, as Spearman's correlation needs."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return r


def spearman(x, y):
    rx, ry = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def fmt(m, s=None, digits=3):
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "out", "repro")
    shard = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "data", "words_train.bin")
    names = sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d)))
    seeds = sorted({int(n.rsplit("_s", 1)[1]) for n in names})
    runs = {}
    for n in names:
        e, rest = n.split("_", 1)
        method, seed = rest.rsplit("_s", 1)
        r = read_run(out, n)
        if r is not None:
            runs[(int(e[1:]), method, int(seed))] = r
    train = np.fromfile(shard, dtype=np.uint16, offset=1024)
    counts = np.bincount(train, minlength=65536).astype(float)
    log_freq = np.log(counts + 1)
    lines = ["# Tables of doc/results.md", "",
             f"Generated by `python3 scripts/decide.py {out} {shard}` from the logs of `scripts/repro.sh`.", ""]
    decisions = []

    def seeds_of(e, method):
        return [s for s in seeds if (e, method, s) in runs]

    # every run
    lines += ["## Every configuration", "",
              "| E | method | seeds | final val loss (mean ± sd) | activated, 2nd half | settled p |",
              "| --- | --- | --- | --- | --- | --- |"]
    for e in sorted(TARGET):
        for method in {**METHODS, **METHODS_2}:
            ss = seeds_of(e, method)
            if not ss:
                continue
            lm, ls = mean_sd([runs[(e, method, s)]["final"] for s in ss])
            am = np.mean([runs[(e, method, s)]["a_half"] for s in ss])
            pm = np.mean([runs[(e, method, s)]["p_half"] for s in ss])
            settled = "—" if method.startswith("topk") else f"{pm:.3f}" + (" (layer 0)" if method == "dtopp_layer" else "")
            lines.append(f"| {e} | {({**METHODS, **METHODS_2})[method]} | {len(ss)} | {fmt(lm, ls)} | {am:.3f} | "
                         f"{settled} |")
    lines.append("")

    def compare(e, a, b, claim_above, claim_below):
        ss = [s for s in seeds_of(e, a) if (e, b, s) in runs]
        if not ss:
            return None
        la = [runs[(e, a, s)]["final"] for s in ss]
        lb = [runs[(e, b, s)]["final"] for s in ss]
        m, s, hw = paired(la, lb)
        ca = np.mean([runs[(e, a, s)]["a_half"] for s in ss])
        cb = np.mean([runs[(e, b, s)]["a_half"] for s in ss])
        equal = abs(ca - cb) <= 0.05 * ca and (b == "topp" or abs(cb - TARGET[e]) <= 0.05 * TARGET[e])
        v = verdict(m, hw, claim_above, claim_below) if equal else "unequal compute"
        return {"n": len(ss), "d": m, "sd": s, "hw": hw, "a": ca, "b": cb, "verdict": v,
                "per_seed": [y - x for x, y in zip(la, lb)]}

    # rules 1, 2, 3, 6: paired comparisons
    lines += ["## Paired comparisons (rules 1, 2, 3, 6)", "",
              "d = loss(other) − loss(DTop-p) per seed, in nats per token: positive favours DTop-p.", "",
              "| E | other method | seeds | d per seed | mean d ± sd | 95% interval | activated: DTop-p, other "
              "| verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    results = {}
    for e, other in [(16, "topk"), (16, "topp"), (8, "topk"), (32, "topk"), (16, "pi_only"), (16, "drn_only"),
                     (16, "dtopp_layer"), (8, "topk_raw"), (64, "topk")]:
        c = compare(e, "dtopp", other, "DTop-p better", f"{METHODS[other]} better")
        if c is None:
            continue
        results[(e, other)] = c
        lines.append(f"| {e} | {METHODS[other]} | {c['n']} | {', '.join(f'{x:+.4f}' for x in c['per_seed'])} | "
                     f"{c['d']:+.4f} ± {c['sd']:.4f} | [{c['d'] - c['hw']:+.4f}, {c['d'] + c['hw']:+.4f}] | "
                     f"{c['a']:.3f}, {c['b']:.3f} | {c['verdict']} |")
        decisions.append((f"DTop-p vs {METHODS[other]}, E = {e}", f"{c['d']:+.4f} [{c['d'] - c['hw']:+.4f}, "
                          f"{c['d'] + c['hw']:+.4f}]", c["verdict"]))
    lines.append("")

    # rule 3: does the advantage grow with granularity?
    if (8, "topk") in results and (32, "topk") in results:
        ss = [s for s in seeds if all((e, m, s) in runs for e in (8, 32) for m in ("dtopp", "topk"))]
        g = [(runs[(32, "topk", s)]["final"] - runs[(32, "dtopp", s)]["final"]) -
             (runs[(8, "topk", s)]["final"] - runs[(8, "dtopp", s)]["final"]) for s in ss]
        m, sd = mean_sd(g)
        hw = T95.get(len(g) - 1, 1.96) * sd / math.sqrt(len(g)) if len(g) > 1 else float("inf")
        v = verdict(m, hw, "reproduced", "contradicted")
        lines += ["## Granularity (rule 3)", "",
                  f"d(E = 32) − d(E = 8) per seed: {', '.join(f'{x:+.4f}' for x in g)}; mean {m:+.4f} ± {sd:.4f}, "
                  f"95% interval [{m - hw:+.4f}, {m + hw:+.4f}]: **{v}**.", ""]
        decisions.append(("DTop-p's advantage grows from E = 8 to E = 32", f"{m:+.4f} [{m - hw:+.4f}, {m + hw:+.4f}]", v))
        ss = [s for s in ss if (8, "topk_raw", s) in runs]
        if ss:  # the same with the Top-1 that keeps its router gradient (added after the results)
            g = [(runs[(32, "topk", s)]["final"] - runs[(32, "dtopp", s)]["final"]) -
                 (runs[(8, "topk_raw", s)]["final"] - runs[(8, "dtopp", s)]["final"]) for s in ss]
            m, sd = mean_sd(g)
            hw = T95.get(len(g) - 1, 1.96) * sd / math.sqrt(len(g)) if len(g) > 1 else float("inf")
            v = verdict(m, hw, "reproduced", "contradicted")
            lines += [f"Against Top-1 with gates not renormalised at E = 8 (added after the results): per seed "
                      f"{', '.join(f'{x:+.4f}' for x in g)}; mean {m:+.4f} ± {sd:.4f}, 95% interval "
                      f"[{m - hw:+.4f}, {m + hw:+.4f}]: **{v}**.", ""]
            decisions.append(("the same, against Top-1 without renormalised gates at E = 8 (added after the results)",
                              f"{m:+.4f} [{m - hw:+.4f}, {m + hw:+.4f}]", v))

    # rule 4: depth
    ss = seeds_of(16, "dtopp")
    if ss:
        per_layer = np.array([runs[(16, "dtopp", s)]["experts"].mean(axis=0) for s in ss])
        L = per_layer.shape[1]
        tgt = TARGET[16]
        shallow = per_layer[:, :2].mean(axis=1)
        deep = per_layer[:, -2:].mean(axis=1)
        if all((shallow < tgt) & (deep > tgt)):
            v = "reproduced"
        elif all((shallow > tgt) & (deep < tgt)):
            v = "contradicted"
        else:
            v = "partly"
        lines += ["## Depth (rule 4)", "",
                  "Mean activated experts per token in each layer, DTop-p at E = 16 (target 2), validation "
                  "tokens of the final evaluation:", "",
                  "| seed | " + " | ".join(f"layer {l}" for l in range(L)) + " | first two | last two |",
                  "| --- | " + " | ".join("---" for _ in range(L)) + " | --- | --- |"]
        for i, s in enumerate(ss):
            lines.append(f"| {s} | " + " | ".join(f"{x:.2f}" for x in per_layer[i]) +
                         f" | {shallow[i]:.2f} | {deep[i]:.2f} |")
        lines += ["", f"Verdict: **{v}**.", ""]
        decisions.append(("shallow layers use fewer experts, deep layers more",
                          f"first two {shallow.mean():.2f}, last two {deep.mean():.2f}", v))
        ssl = seeds_of(16, "dtopp_layer")
        if ssl:
            pl = np.array([runs[(16, "dtopp_layer", s)]["p_layers_half"] for s in ssl])
            al = np.array([runs[(16, "dtopp_layer", s)]["experts"].mean(axis=0) for s in ssl])
            lines += ["One threshold per layer (mean over seeds; p over the second half, experts at the final "
                      "evaluation):", "", "| | " + " | ".join(f"layer {l}" for l in range(L)) + " |",
                      "| --- | " + " | ".join("---" for _ in range(L)) + " |",
                      "| p | " + " | ".join(f"{x:.3f}" for x in pl.mean(axis=0)) + " |",
                      "| experts | " + " | ".join(f"{x:.2f}" for x in al.mean(axis=0)) + " |", ""]

    # rule 5: adaptivity
    lines += ["## Adaptivity (rule 5)", "",
              "Spearman correlation over the validation tokens of the final evaluation between a token's "
              "activated experts and its loss / the log-frequency of the token in the training split.", "",
              "| E | method | seed | vs loss, all layers | vs log-frequency, all layers | vs loss, per layer "
              "| vs log-frequency, per layer |", "| --- | --- | --- | --- | --- | --- | --- |"]
    adapt = {}
    for e in sorted(TARGET):
        for method in ("dtopp", "pi_only", "dtopp_layer"):
            for s in seeds_of(e, method):
                r = runs[(e, method, s)]
                total = r["experts"].sum(axis=1)
                rl = spearman(total, r["loss"])
                rf = spearman(total, log_freq[r["tokens"]])
                per = [spearman(r["experts"][:, l], r["loss"]) for l in range(r["experts"].shape[1])]
                per_f = [spearman(r["experts"][:, l], log_freq[r["tokens"]]) for l in range(r["experts"].shape[1])]
                adapt[(e, method, s)] = (rl, rf, per)
                lines.append(f"| {e} | {METHODS[method]} | {s} | {rl:+.3f} | {rf:+.3f} | "
                             f"{' '.join(f'{x:+.2f}' for x in per)} | {' '.join(f'{x:+.2f}' for x in per_f)} |")
    lines.append("")
    for e in sorted(TARGET):
        rs = [adapt[(e, "dtopp", s)] for s in seeds_of(e, "dtopp")]
        if not rs:
            continue
        rl = [x[0] for x in rs]
        rf = [x[1] for x in rs]
        vl = "reproduced" if min(rl) >= 0.1 else "contradicted" if max(rl) <= -0.1 else "not decided"
        vf = "reproduced" if max(rf) <= -0.1 else "contradicted" if min(rf) >= 0.1 else "not decided"
        decisions.append((f"hard tokens recruit more experts (E = {e})", f"ρ = {', '.join(f'{x:+.3f}' for x in rl)}", vl))
        decisions.append((f"rare tokens recruit more experts (E = {e})", f"ρ = {', '.join(f'{x:+.3f}' for x in rf)}", vf))

    decisions_2 = second_round(runs, seeds, log_freq, compare, lines)
    lines += ["## Decisions", "", "| claim | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {c} | {m} | {v} |" for c, m, v in decisions]
    lines.append("")
    if decisions_2:
        lines += ["## Decisions of the second round", "", "| claim | measured | verdict |", "| --- | --- | --- |"]
        lines += [f"| {c} | {m} | {v} |" for c, m, v in decisions_2]
        lines.append("")
    with open(os.path.join(DOC, "results_table.md"), "w") as f:
        f.write("\n".join(lines))
    for c, m, v in decisions + decisions_2:
        print(f"decide: {c}: {m}: {v}")
    plots(runs, seeds, log_freq)


def tenths(series):
    """The means of a per-step series over each tenth of the run."""
    n = len(series)
    return [float(np.mean(series[i * n // 10:(i + 1) * n // 10])) for i in range(10)]


def adaptivity(r, log_freq):
    """Rule 5's correlations of one run: activated experts (all layers) against token loss, log-frequency."""
    total = r["experts"].sum(axis=1)
    return spearman(total, r["loss"]), spearman(total, log_freq[r["tokens"]])


def second_round(runs, seeds, log_freq, compare, lines):
    """Rules 7-9 of doc/results.md ("Second round"): appends their tables to lines, returns their decisions."""
    decisions = []

    def having(keys):
        return [s for s in seeds if all((e, m, s) in runs for e, m in keys)]

    def gap(e, dtopp, topk, s):  # loss(Top-k) − loss(DTop-p) of one seed
        return runs[(e, topk, s)]["final"] - runs[(e, dtopp, s)]["final"]

    def paired_rule(title, claim, d, above, below):
        m, sd, hw = interval(d)
        v = verdict(m, hw, above, below)
        lines.extend([f"{title}: per seed {', '.join(f'{x:+.4f}' for x in d)}; mean {m:+.4f} ± {sd:.4f}, "
                      f"95% interval [{m - hw:+.4f}, {m + hw:+.4f}]: **{v}**.", ""])
        decisions.append((claim, f"{m:+.4f} [{m - hw:+.4f}, {m + hw:+.4f}]", v))

    lines.extend(["## Second round (rules 7-9)", ""])
    # rule 7: granularity at budgets 2, 4, 8
    both = [(e, m) for e in (16, 64) for m in ("dtopp", "topk")]
    if having(both):
        paired_rule("Granularity (rule 7), d(E = 64) − d(E = 16)", "DTop-p's advantage grows from E = 16 to E = 64",
                    [gap(64, "dtopp", "topk", s) - gap(16, "dtopp", "topk", s) for s in having(both)],
                    "reproduced", "contradicted")
        for lo, hi in ((16, 32), (32, 64)):
            ss = having([(e, m) for e in (lo, hi) for m in ("dtopp", "topk")])
            if ss:
                m, sd, hw = interval([gap(hi, "dtopp", "topk", s) - gap(lo, "dtopp", "topk", s) for s in ss])
                lines.extend([f"d(E = {hi}) − d(E = {lo}), reported without a verdict: {m:+.4f}, 95% interval "
                              f"[{m - hw:+.4f}, {m + hw:+.4f}].", ""])

    # rule 8: layer 0 on a fixed Top-2; the shallow-to-deep trend over the routed layers 1-7
    ss = having([(16, "dtopp_l0topk")])
    if ss:
        per_layer = np.array([runs[(16, "dtopp_l0topk", s)]["experts"].mean(axis=0) for s in ss])
        tgt = TARGET[16]
        shallow, deep = per_layer[:, 1:3].mean(axis=1), per_layer[:, -2:].mean(axis=1)
        v = ("reproduced" if all((shallow < tgt) & (deep > tgt)) else
             "contradicted" if all((shallow > tgt) & (deep < tgt)) else "partly")
        L = per_layer.shape[1]
        lines.extend(["The first layer (rule 8): mean activated experts per token in each layer, layer 0 on a fixed "
                      "Top-2, final validation:", "",
                      "| seed | " + " | ".join(f"layer {l}" for l in range(L)) + " | layers 1-2 | layers 6-7 |",
                      "| --- | " + " | ".join("---" for _ in range(L)) + " | --- | --- |"])
        lines.extend(f"| {s} | " + " | ".join(f"{x:.2f}" for x in per_layer[i]) + f" | {shallow[i]:.2f} | {deep[i]:.2f} |"
                     for i, s in enumerate(ss))
        lines.extend(["", f"Verdict: **{v}**.", ""])
        decisions.append(("layer 0 on a fixed Top-2: shallow layers use fewer experts, deep layers more",
                          f"layers 1-2 {shallow.mean():.2f}, layers 6-7 {deep.mean():.2f}", v))
        for other in ("dtopp", "topk"):  # the loss, without a claim of the paper behind it
            c = compare(16, "dtopp_l0topk", other, "layer 0 on Top-2 better", f"{METHODS[other]} better")
            if c is not None:
                decisions.append((f"layer 0 on a fixed Top-2 against {METHODS[other]}, loss(other) − loss(it) "
                                  "(no claim of the paper)", f"{c['d']:+.4f} [{c['d'] - c['hw']:+.4f}, "
                                  f"{c['d'] + c['hw']:+.4f}]", c["verdict"]))
    # rule 8, through training: the per-layer pattern of the second tenth against the last tenth
    for method, first in (("dtopp", 0), ("dtopp_l0topk", 1)):  # over the layers the threshold routes
        ss = having([(16, method)])
        if not ss:
            continue
        rhos, tops = [], []
        for s in ss:
            pattern = np.array([tenths(a) for a in runs[(16, method, s)]["layer_a_train"][first:]])  # (layers, 10)
            rhos.append(spearman(pattern[:, 1], pattern[:, 9]))
            tops.append(" ".join(str(first + int(np.argmax(pattern[:, i]))) for i in range(10)))
        v = "stable" if min(rhos) >= 0.8 else "moving" if max(rhos) < 0.8 else "not decided"
        label = ({**METHODS, **METHODS_2})[method]
        lines.extend([f"Per-layer pattern through training, {label}: Spearman ρ(second tenth, last tenth) per seed "
                      f"{', '.join(f'{x:+.2f}' for x in rhos)}: **{v}**; the layer with the most experts in each tenth: "
                      + "; ".join(f"seed {s}: {t}" for s, t in zip(ss, tops)) + ".", ""])
        decisions.append((f"the per-layer pattern holds through training ({label})",
                          f"ρ = {', '.join(f'{x:+.2f}' for x in rhos)}", v))

    # rule 9: three epochs against one
    ss = having([(16, m) for m in ("dtopp", "topk", "dtopp_ep3", "topk_ep3")])
    if ss:
        paired_rule("Longer training (rule 9), G(3 epochs) − G(1 epoch)", "the DTop-p − Top-k gap grows with training",
                    [gap(16, "dtopp_ep3", "topk_ep3", s) - gap(16, "dtopp", "topk", s) for s in ss], "grows", "shrinks")
        c = compare(16, "dtopp_ep3", "topk_ep3", "DTop-p better", "Top-k better")
        decisions.append(("DTop-p vs Top-k at three epochs (rule 1)", f"{c['d']:+.4f} [{c['d'] - c['hw']:+.4f}, "
                          f"{c['d'] + c['hw']:+.4f}]", c["verdict"]))
        one = [adaptivity(runs[(16, "dtopp", s)], log_freq) for s in ss]
        three = [adaptivity(runs[(16, "dtopp_ep3", s)], log_freq) for s in ss]
        paired_rule("ρ(experts, token loss), three epochs − one", "hard tokens recruit more experts: stronger with "
                    "training", [b[0] - a[0] for a, b in zip(one, three)], "stronger", "weaker")
        paired_rule("ρ(experts, log-frequency), three epochs − one", "rare tokens recruit more experts: stronger with "
                    "training", [b[1] - a[1] for a, b in zip(one, three)], "weaker", "stronger")
        rl, rf = [x[0] for x in three], [x[1] for x in three]
        decisions.append(("hard tokens recruit more experts (three epochs)", f"ρ = {', '.join(f'{x:+.3f}' for x in rl)}",
                          "reproduced" if min(rl) >= 0.1 else "contradicted" if max(rl) <= -0.1 else "not decided"))
        decisions.append(("rare tokens recruit more experts (three epochs)", f"ρ = {', '.join(f'{x:+.3f}' for x in rf)}",
                          "reproduced" if max(rf) <= -0.1 else "contradicted" if min(rf) >= 0.1 else "not decided"))
    return decisions


def plots(runs, seeds, log_freq):
    os.makedirs(PLOTS, exist_ok=True)
    colours = {"dtopp": "tab:green", "topk": "tab:blue", "topp": "tab:orange", "pi_only": "tab:olive",
               "drn_only": "tab:purple", "dtopp_layer": "tab:cyan", "topk_raw": "tab:grey"}
    # validation loss over training, E = 16
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        for s in seeds:
            r = runs.get((16, method, s))
            if r is None:
                continue
            st, v = zip(*r["val"][1:])
            ax[0].plot(st, v, color=colours[method], alpha=0.7, label=METHODS[method] if s == seeds[0] else None)
            ax[1].plot(r["steps"], r["activated"], color=colours[method], alpha=0.5, lw=0.6,
                       label=METHODS[method] if s == seeds[0] else None)
    ax[0].set(xlabel="step", ylabel="validation loss (nats/token)", title="E = 16, target 2")
    ax[0].legend(fontsize=7)
    ax[1].set(xlabel="step", ylabel="activated experts per token", title="a_t, E = 16", ylim=(0, 6))
    fig.tight_layout()
    fig.savefig(os.path.join(PLOTS, "repro_loss.png"), dpi=110)
    plt.close(fig)

    # granularity: paired difference per E
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, e in enumerate(sorted(TARGET)):
        d = [runs[(e, "topk", s)]["final"] - runs[(e, "dtopp", s)]["final"] for s in seeds
             if (e, "topk", s) in runs and (e, "dtopp", s) in runs]
        raw = [runs[(e, "topk_raw", s)]["final"] - runs[(e, "dtopp", s)]["final"] for s in seeds
               if (e, "topk_raw", s) in runs and (e, "dtopp", s) in runs]
        if raw:
            ax.scatter([i - 0.1] * len(raw), raw, color="tab:grey", marker="x",
                       label="against Top-1 without renormalised gates")
            ax.legend(fontsize=7)
        if d:
            ax.scatter([i] * len(d), d, color="tab:green")
            ax.errorbar([i + 0.1], [np.mean(d)], yerr=[np.std(d, ddof=1) if len(d) > 1 else 0], fmt="o", color="k")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(TARGET)), [f"E = {e}, target {TARGET[e]}" for e in sorted(TARGET)])
    ax.set(ylabel="loss(Top-k) − loss(DTop-p), nats/token", title="granularity (dots: seeds; bar: mean ± sd)")
    fig.tight_layout()
    fig.savefig(os.path.join(PLOTS, "repro_granularity.png"), dpi=110)
    plt.close(fig)

    # depth: experts per layer
    fig, ax = plt.subplots(figsize=(6, 4))
    for e in sorted(TARGET):
        for method, ls in (("dtopp", "-"), ("dtopp_layer", ":")):
            ss = [s for s in seeds if (e, method, s) in runs]
            if not ss:
                continue
            pl = np.array([runs[(e, method, s)]["experts"].mean(axis=0) for s in ss]) / TARGET[e]
            ax.errorbar(range(pl.shape[1]), pl.mean(axis=0), yerr=pl.std(axis=0), ls=ls, marker="o",
                        label=f"{METHODS[method]}, E = {e}")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set(xlabel="layer", ylabel="activated experts / target", title="experts per layer (final validation)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(PLOTS, "repro_layers.png"), dpi=110)
    plt.close(fig)

    # adaptivity: mean experts against loss and against frequency, DTop-p E = 16, all seeds
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for s in seeds:
        r = runs.get((16, "dtopp", s))
        if r is None:
            continue
        total = r["experts"].sum(axis=1) / r["experts"].shape[1]
        for k, x in enumerate((r["loss"], log_freq[r["tokens"]])):
            edges = np.quantile(x, np.linspace(0, 1, 11))
            idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, 9)
            ax[k].plot([x[idx == b].mean() for b in range(10)], [total[idx == b].mean() for b in range(10)],
                       marker="o", label=f"seed {s}")
    ax[0].set(xlabel="token loss (deciles)", ylabel="experts per token per layer", title="DTop-p, E = 16")
    ax[1].set(xlabel="log frequency of the token in training (deciles)", ylabel="experts per token per layer")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(PLOTS, "repro_adaptivity.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
