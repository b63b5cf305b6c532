"""Generate (or check) the reference test fixtures with the float64 PyTorch reference.

    python3 reference/make_fixtures.py --out test/fixtures      # write every fixture
    python3 reference/make_fixtures.py --check test/fixtures    # regenerate and compare

For every fixture NAME this writes NAME_model.bin (the starting model checkpoint) and NAME_ref.bin
(the reference fixture), both as described in doc/formats.md. Everything is computed in float64
from exactly the float32 values of the checkpoint, and stored as float32.

A fixture is rejected and redrawn (new model seed and new batch) when, at any step of its training
trajectory (step 0 included), a routing decision or the clipping decision is too close to call for
a float32 implementation:
  - a running sum of kept probabilities (for every candidate examined, up to and including the
    first dropped one) within 1e-4 of the layer's p;
  - two probabilities within 1e-4 of each other on both sides of the cut (top-k or top-p);
  - the global gradient norm within 1e-3 (relative) of the clipping threshold 1.0;
  - the controller's unclamped p' within 1e-6 of pmin or pmax (the anti-windup decision).
At step 0, whose routing decisions are recorded in order, consecutive probabilities inside S must
also differ by at least 1e-6, so that the recorded selection order is unambiguous.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dtopp_ref as R  # noqa: E402

RUNSUM_MARGIN = 1e-4
CUT_MARGIN = 1e-4
ORDER_MARGIN = 1e-6
CLIP_MARGIN = 1e-3
CLAMP_MARGIN = 1e-6
MAX_REDRAWS = 200

COMMON = dict(max_seq_len=32, V=300, Vp=384, L=2, NH=2, C=32, E=8, H=32)

# name -> (model config, generation options)
FIXTURES = {
    "topk": (dict(COMMON, routing="topk", k=2, drn=0, renorm=1, lb_coef=1e-4, ent_coef=0.0),
             dict(seed=1000, wr_std=0.1, B=2, T=16, n_steps=20, warmup=3, lr=1e-2)),
    "topp": (dict(COMMON, NH=4, routing="topp", p=0.5, drn=0, renorm=1, lb_coef=0.01, ent_coef=0.01),
             dict(seed=2000, wr_std=0.2, B=2, T=16, n_steps=16, warmup=3, lr=1e-2)),
    "dtopp": (dict(COMMON, routing="dtopp", controller="global", drn=1, renorm=1, theta_init=1.0,
                   tgt=3.0, Kp=0.3, Ki=0.05, p0=0.5, pmin=0.01, pmax=1.0, lb_coef=0.01, ent_coef=0.01),
              dict(seed=3000, wr_std=0.1, B=2, T=16, n_steps=12, warmup=3, lr=1e-2)),
    "dtopp_layer": (dict(COMMON, L=3, routing="dtopp", controller="layer", drn=1, renorm=1,
                         theta_init=1.5, tgt=2.5, Kp=0.5, Ki=0.1, p0=0.5, pmin=0.05, pmax=0.65,
                         lb_coef=0.01, ent_coef=0.01),
                    dict(seed=4000, wr_std=0.1, B=2, T=16, n_steps=12, warmup=3, lr=1e-2)),
    "dtopp_raw": (dict(COMMON, routing="dtopp", controller="global", drn=1, renorm=0, theta_init=1.2,
                       tgt=2.0, Kp=0.3, Ki=0.05, p0=0.6, pmin=0.01, pmax=1.0, lb_coef=1e-4, ent_coef=1e-3),
                  dict(seed=5000, wr_std=0.1, B=2, T=16, n_steps=12, warmup=3, lr=3e-3)),
    "dtopp_wide": (dict(COMMON, routing="dtopp", controller="global", drn=1, renorm=1, theta_init=2.0,
                        tgt=2.5, Kp=0.3, Ki=0.05, p0=0.85, pmin=0.01, pmax=1.0, lb_coef=0.01, ent_coef=0.01),
                   dict(seed=6000, wr_std=0.3, B=2, T=16, n_steps=12, warmup=3, lr=1e-2, wide=True)),
}


class Reject(Exception):
    pass


def check_routing(record, cfg, step, strict_order):
    """Raise Reject if any routing decision of this forward pass is too close to call."""
    E = cfg.E
    for l, r in enumerate(record):
        Ps, excl, n = r["sorted_P"], r["excl"], r["n_sel"]
        ar = torch.arange(E)
        if cfg.routing == "topk":
            k = cfg.k
            gap = float((Ps[:, k - 1] - Ps[:, k]).min())
            if gap < CUT_MARGIN:
                raise Reject(f"step {step} layer {l}: top-k cut gap {gap:.2e}")
        else:
            p = r["p"]
            examined = ar[None, :] <= n[:, None]            # kept ones and the first dropped one
            d = (excl - p).abs()[examined]
            if d.numel() and float(d.min()) < RUNSUM_MARGIN:
                raise Reject(f"step {step} layer {l}: running sum {float(d.min()):.2e} from p")
            cut = n < E
            if bool(cut.any()):
                rows = torch.nonzero(cut).flatten()
                gap = Ps[rows, n[rows] - 1] - Ps[rows, n[rows]]
                if float(gap.min()) < CUT_MARGIN:
                    raise Reject(f"step {step} layer {l}: top-p cut gap {float(gap.min()):.2e}")
        if strict_order:
            nk = torch.full_like(n, cfg.k) if cfg.routing == "topk" else n
            inside = ar[None, :E - 1] < (nk[:, None] - 1)     # pairs (j, j+1) both in S
            gaps = (Ps[:, :-1] - Ps[:, 1:])[inside]
            if gaps.numel() and float(gaps.min()) < ORDER_MARGIN:
                raise Reject(f"step {step} layer {l}: order inside S ambiguous ({float(gaps.min()):.2e})")


def attempt(name, cfg_kw, opt, seed, outdir):
    cfg = R.Config(**cfg_kw)
    B, T, n_steps, warmup = opt["B"], opt["T"], opt["n_steps"], opt["warmup"]
    lr_peak, wd = R.f32(opt["lr"]), R.f32(0.1)
    model0 = R.init_model(cfg, seed, wr_std=opt["wr_std"])
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, cfg.V, (B, T), generator=g)
    tgt = torch.randint(0, cfg.V, (B, T), generator=g)

    model_path = os.path.join(outdir, f"{name}_model.bin")
    R.save_model(model0, model_path)
    model = R.load_model(model_path)             # start from exactly what the checkpoint holds
    assert np.array_equal(model.flat_params(), model0.flat_params())

    # the reference quantities at the starting point
    rec = []
    model.zero_grad()
    logits, losses = R.forward(model, idx, tgt, record=rec)
    losses["total"].backward()
    check_routing(rec, cfg, 0, strict_order=True)
    dec = R.routing_decisions(rec, cfg)
    n_sel = dec["n_selected"]
    if opt.get("wide"):
        if not (n_sel.min() == 1 and n_sel.max() >= cfg.E // 2):
            raise Reject(f"spread of |S| only {n_sel.min()}..{n_sel.max()}")
    grads = model.flat_grads()
    arrays = {
        "inputs": idx.numpy().astype(np.int32).ravel(),
        "targets": tgt.numpy().astype(np.int32).ravel(),
        "logits": logits.detach().numpy().reshape(-1),
        "losses": np.concatenate([[losses["total"].item(), losses["ce"].item()], dec["LB"], dec["H"]]),
        "n_selected": n_sel, "selected": dec["selected"], "gates": dec["gates"], "grads": grads,
    }

    # the trajectory: n_steps full training steps on the same batch
    opt_ = R.make_optimizer(model, weight_decay=wd)
    traj = []
    summary = {"a_t": [], "p": [], "loss": [], "nmin": [], "nmax": [], "norm": []}
    for s in range(n_steps):
        lr = R.lr_at(s, lr_peak, warmup, n_steps)
        st = R.train_step(model, opt_, idx, tgt, lr)
        check_routing(st["record"], cfg, s, strict_order=False)
        if abs(st["grad_norm"] - R.CLIP_NORM) < CLIP_MARGIN * R.CLIP_NORM:
            raise Reject(f"step {s}: gradient norm {st['grad_norm']:.6f} at the clipping threshold")
        for pp in st["p_pre"]:
            if min(abs(pp - cfg.pmin), abs(pp - cfg.pmax)) < CLAMP_MARGIN:
                raise Reject(f"step {s}: controller p' {pp} at a clamp bound")
        ns = torch.stack([r["n_sel"] for r in st["record"]])
        traj.append([st["loss"], st["a_t"]] + model.p.tolist())
        summary["a_t"].append(st["a_t"])
        summary["p"].append(model.p.tolist())
        summary["loss"].append(st["loss"])
        summary["nmin"].append(int(ns.min()))
        summary["nmax"].append(int(ns.max()))
        summary["norm"].append(st["grad_norm"])
    arrays["trajectory"] = np.array(traj)
    R.save_ref(os.path.join(outdir, f"{name}_ref.bin"), cfg, B, T, n_steps, warmup, lr_peak, wd, arrays)
    summary.update(cfg=cfg, n_sel=n_sel, loss0=losses["total"].item(), ce0=losses["ce"].item(),
                   LB=dec["LB"], H=dec["H"], seed=seed)
    return summary


def generate(name, outdir, verbose=True):
    cfg_kw, opt = FIXTURES[name]
    reasons = []
    for redraw in range(MAX_REDRAWS):
        seed = opt["seed"] + 17 * redraw
        try:
            summary = attempt(name, cfg_kw, opt, seed, outdir)
        except Reject as e:
            reasons.append(str(e))
            continue
        summary["redraws"] = redraw
        summary["reasons"] = reasons
        return summary
    raise RuntimeError(f"{name}: no acceptable draw in {MAX_REDRAWS} attempts; last: {reasons[-3:]}")


def describe(name, s):
    cfg = s["cfg"]
    opt = FIXTURES[name][1]
    lines = [f"{name}: redraws {s['redraws']} (seed {s['seed']})"]
    for r in s["reasons"]:
        lines.append(f"    rejected: {r}")
    extra = {"topk": f"k={cfg.k}", "topp": f"p={cfg.p:g}"}.get(
        cfg.routing, f"controller={cfg.controller} tgt={cfg.tgt:g} Kp={cfg.Kp:g} Ki={cfg.Ki:g} "
                     f"p0={cfg.p0:g} pmin={cfg.pmin:g} pmax={cfg.pmax:g}")
    lines.append(f"    L={cfg.L} NH={cfg.NH} C={cfg.C} E={cfg.E} H={cfg.H} V={cfg.V} Vp={cfg.Vp} "
                 f"B={opt['B']} T={opt['T']} | {cfg.routing} {extra} drn={cfg.drn} renorm={cfg.renorm} "
                 f"theta_init={cfg.theta_init:g} wr_std={opt['wr_std']:g} lb={cfg.lb_coef:g} ent={cfg.ent_coef:g} "
                 f"| steps={opt['n_steps']} warmup={opt['warmup']} lr={opt['lr']:g}")
    ns = s["n_sel"]
    hist = np.bincount(ns.ravel(), minlength=cfg.E + 1)[1:]
    lines.append(f"    step 0: loss {s['loss0']:.5f} CE {s['ce0']:.5f} LB {np.round(s['LB'], 4).tolist()} "
                 f"H {np.round(s['H'], 4).tolist()} |S| min {ns.min()} max {ns.max()} hist(1..E) {hist.tolist()}")
    lines.append("    a_t: " + " ".join(f"{a:.3f}" for a in s["a_t"]))
    lines.append("    |S| range per step: " + " ".join(f"{a}-{b}" for a, b in zip(s["nmin"], s["nmax"])))
    if cfg.routing != "topk":
        if cfg.controller == "layer" and cfg.routing == "dtopp":
            for l in range(cfg.L):
                lines.append(f"    p[{l}]: " + " ".join(f"{p[l]:.4f}" for p in s["p"]))
        else:
            lines.append("    p: " + " ".join(f"{p[0]:.4f}" for p in s["p"]))
    lines.append("    loss: " + " ".join(f"{x:.4f}" for x in s["loss"]))
    lines.append("    grad norm: " + " ".join(f"{x:.3f}" for x in s["norm"]))
    return "\n".join(lines)


def generate_all(outdir, names, verbose=True):
    os.makedirs(outdir, exist_ok=True)
    for name in names:
        t0 = time.time()
        s = generate(name, outdir)
        if verbose:
            print(describe(name, s) + f"\n    ({time.time() - t0:.1f} s)")


def rel_diff(a, b):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-30)
    return float(np.abs(a - b).max(initial=0.0)) / scale


def compare_files(new, old, kind):
    """Returns (ok, message). Header and integer data identical; float tensors within 1e-6 relative."""
    raw_new, raw_old = open(new, "rb").read(), open(old, "rb").read()
    hw = 4 * R.HEADER_WORDS
    if raw_new[:hw] != raw_old[:hw]:
        return False, "header differs"
    if len(raw_new) != len(raw_old):
        return False, f"size differs ({len(raw_old)} vs {len(raw_new)} bytes)"
    tensors = []   # (name, is_int, new, old)
    if kind == "model":
        cfg, _, _ = R.read_model_header(old)
        a = np.frombuffer(raw_new[hw:], dtype="<f4")
        b = np.frombuffer(raw_old[hw:], dtype="<f4")
        off = 0
        for name, shape in R.param_shapes(cfg).items():
            cnt = int(np.prod(shape))
            tensors.append((name, False, a[off:off + cnt], b[off:off + cnt]))
            off += cnt
        tensors.append(("p", False, a[off:off + cfg.L], b[off:off + cfg.L]))
        tensors.append(("I", False, a[off + cfg.L:], b[off + cfg.L:]))
    else:
        x, y = R.load_ref(new), R.load_ref(old)
        cfg, _, _ = R.read_model_header(old.replace("_ref.bin", "_model.bin"))
        for name, dt, _ in R.ref_layout(y["B"], y["T"], y["V"], y["L"], y["E"], y["num_params"], y["n_steps"]):
            if name == "grads":
                off = 0
                for pname, shape in R.param_shapes(cfg).items():
                    cnt = int(np.prod(shape))
                    tensors.append((f"grads.{pname}", False, x[name][off:off + cnt], y[name][off:off + cnt]))
                    off += cnt
            elif name == "losses":
                L = y["L"]
                for i, part in enumerate(["total", "CE"] + [f"LB{l}" for l in range(L)] + [f"H{l}" for l in range(L)]):
                    tensors.append((f"losses.{part}", False, x[name][i:i + 1], y[name][i:i + 1]))
            elif name == "trajectory":
                tr_x = x[name].reshape(y["n_steps"], -1)
                tr_y = y[name].reshape(y["n_steps"], -1)
                tensors.append(("trajectory.loss", False, tr_x[:, 0], tr_y[:, 0]))
                tensors.append(("trajectory.a_t", False, tr_x[:, 1], tr_y[:, 1]))
                tensors.append(("trajectory.p", False, tr_x[:, 2:], tr_y[:, 2:]))
            else:
                tensors.append((name, dt == np.int32, x[name], y[name]))
    worst, worst_name = 0.0, ""
    for name, is_int, a, b in tensors:
        if is_int:
            if not np.array_equal(a, b):
                return False, f"integer data '{name}' differs"
        else:
            d = rel_diff(a, b)
            if d > worst:
                worst, worst_name = d, name
            if d > 1e-6:
                return False, f"'{name}' differs by {d:.2e} (relative, > 1e-6)"
    return True, f"max relative diff {worst:.1e}" + (f" ({worst_name})" if worst_name else "")


def check_all(refdir, names):
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        generate_all(tmp, names, verbose=False)
        for name in names:
            for kind in ("model", "ref"):
                fn = f"{name}_{kind}.bin"
                old = os.path.join(refdir, fn)
                if not os.path.exists(old):
                    print(f"MISSING  {fn}")
                    bad += 1
                    continue
                try:
                    ok, msg = compare_files(os.path.join(tmp, fn), old, kind)
                except (ValueError, OSError) as e:
                    ok, msg = False, str(e)
                print(f"{'OK      ' if ok else 'MISMATCH'} {fn}: {msg}")
                bad += not ok
    if bad:
        print(f"{bad} file(s) missing or different")
        return 1
    print("all fixtures match")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="directory to write the fixtures into")
    g.add_argument("--check", help="directory holding the fixtures to compare against")
    ap.add_argument("--only", nargs="*", choices=list(FIXTURES), help="only these fixtures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    names = args.only or list(FIXTURES)
    t0 = time.time()
    if args.out:
        generate_all(args.out, names)
        for name in names:
            for kind in ("model", "ref"):
                fn = os.path.join(args.out, f"{name}_{kind}.bin")
                print(f"wrote {fn} ({os.path.getsize(fn)} bytes)")
        print(f"total {time.time() - t0:.1f} s")
        return 0
    rc = check_all(args.check, names)
    print(f"total {time.time() - t0:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
