"""Generate (or check) the diffusion transformer's test fixtures with the float64 reference.

    python3 reference/make_dit_fixtures.py --out test/fixtures/dit      # write every fixture
    python3 reference/make_dit_fixtures.py --check test/fixtures/dit    # regenerate and compare

For every fixture NAME this writes NAME_model.bin (the starting DiT checkpoint) and NAME_ref.bin
(what the reference computes from it on a batch of three images: the predicted velocity, the
losses, every routing decision, every gradient, and a trajectory of training steps with controller
updates), as described in doc/formats.md. A draw whose routing, clipping or controller decision
is too close to call in float32 is rejected and redrawn, with the margins of make_fixtures.py.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dit_ref as D  # noqa: E402
import dtopp_ref as R  # noqa: E402
import make_fixtures as M  # noqa: E402

COMMON = dict(L=2, NH=2, C=32, E=4, H=32)
FIXTURES = {
    "dit_topk": (dict(COMMON, routing="topk", k=2, drn=0, renorm=1, lb_coef=0.01, ent_coef=0.0),
                 dict(seed=7000, wr_std=0.3, B=3, n_steps=10, warmup=3, lr=1e-2, sample_steps=4,
                      guidance=2.0)),
    "dit_dtopp": (dict(COMMON, routing="dtopp", controller="global", drn=1, renorm=1, theta_init=1.5,
                       tgt=2.0, Kp=0.3, Ki=0.05, p0=0.75, pmin=0.01, pmax=1.0, lb_coef=0.01, ent_coef=0.01),
                  dict(seed=8000, wr_std=0.3, B=3, n_steps=10, warmup=3, lr=1e-2, sample_steps=4,
                       guidance=2.0)),
}


def attempt(name, routing, opt, seed, outdir):
    dcfg = D.DitConfig()
    cfg = D.trunk_config(dcfg, **routing)
    B, n_steps, warmup = opt["B"], opt["n_steps"], opt["warmup"]
    lr_peak, wd = R.f32(opt["lr"]), R.f32(0.1)
    model_path = os.path.join(outdir, f"{name}_model.bin")
    D.save_model(D.init_model(dcfg, cfg, seed, wr_std=opt["wr_std"]), model_path)
    model = D.load_model(model_path)   # start from exactly what the checkpoint holds
    g = torch.Generator().manual_seed(seed + 1)
    S = dcfg.image_size
    x0 = (torch.randint(0, 256, (B, S, S), generator=g).double() / 127.5 - 1.0).float().double()
    noise = torch.randn(B, S, S, generator=g, dtype=torch.float64).float().double()
    t = torch.rand(B, generator=g, dtype=torch.float64).float().double()
    labels = torch.randint(0, dcfg.num_classes, (B,), generator=g)
    labels[-1] = dcfg.num_classes        # the null class of guidance
    xt, target = D.rectified_flow_pair(x0, noise, t)

    rec = []
    v, losses = D.forward(model, xt, t, labels, target, record=rec)
    losses["total"].backward()
    M.check_routing(rec, cfg, 0, strict_order=True)
    dec = R.routing_decisions(rec, cfg)
    arrays = {"x0": x0.numpy(), "noise": noise.numpy(), "t": t.numpy(), "labels": labels.numpy(),
              "velocity": v.detach().numpy(),
              "losses": np.concatenate([[losses["total"].item(), losses["mse"].item()], dec["LB"], dec["H"]]),
              "n_selected": dec["n_selected"], "selected": dec["selected"], "gates": dec["gates"],
              "grads": model.flat_grads()}
    # the sampler, from the starting model: Euler steps with guidance from the batch's noise
    records = []
    arrays["sample"] = D.sample(model, noise, labels, opt["sample_steps"], opt["guidance"], records).numpy()
    for i, record in enumerate(records):
        M.check_routing(record, cfg, f"sampling {i}", strict_order=False)
    opt_ = D.make_optimizer(model, weight_decay=wd)
    traj = []
    for s in range(n_steps):
        st = D.train_step(model, opt_, xt, t, labels, target, R.lr_at(s, lr_peak, warmup, n_steps))
        M.check_routing(st["record"], cfg, s, strict_order=False)
        if abs(st["grad_norm"] - R.CLIP_NORM) < M.CLIP_MARGIN * R.CLIP_NORM:
            raise M.Reject(f"step {s}: gradient norm {st['grad_norm']:.6f} at the clipping threshold")
        for pp in st["p_pre"]:
            if min(abs(pp - cfg.pmin), abs(pp - cfg.pmax)) < M.CLAMP_MARGIN:
                raise M.Reject(f"step {s}: controller p' {pp} at a clamp bound")
        traj.append([st["loss"], st["a_t"]] + model.p.tolist())
    arrays["trajectory"] = np.array(traj)
    D.save_fixture(os.path.join(outdir, f"{name}_ref.bin"), model, B, n_steps, warmup, lr_peak, wd,
                   opt["sample_steps"], R.f32(opt["guidance"]), arrays)
    n_sel = dec["n_selected"]
    return (f"{name}: seed {seed}, loss {losses['total'].item():.5f} (MSE {losses['mse'].item():.5f}), "
            f"|S| {n_sel.min()}..{n_sel.max()}, a_t " + " ".join(f"{x[1]:.3f}" for x in traj))


def generate_all(outdir, names, verbose=True):
    os.makedirs(outdir, exist_ok=True)
    for name in names:
        routing, opt = FIXTURES[name]
        for redraw in range(M.MAX_REDRAWS):
            try:
                summary = attempt(name, routing, opt, opt["seed"] + 17 * redraw, outdir)
                break
            except M.Reject as e:
                if verbose:
                    print(f"{name}: rejected: {e}")
        else:
            raise RuntimeError(f"{name}: no acceptable draw in {M.MAX_REDRAWS} attempts")
        if verbose:
            print(summary)


def compare(new, old):
    """Headers and integer data identical, float data within 1e-6 (relative to the largest value)."""
    a, b = open(new, "rb").read(), open(old, "rb").read()
    if a[:4 * R.HEADER_WORDS] != b[:4 * R.HEADER_WORDS] or len(a) != len(b):
        return False, "header or size differs"
    if old.endswith("_model.bin"):
        fields = [("model", np.float32, (len(a) - 4 * R.HEADER_WORDS) // 4)]
    else:
        f = D.load_fixture(old)
        m = D.load_model(old.replace("_ref.bin", "_model.bin"))
        fields = D.fixture_layout(f["B"], m.dcfg, m.cfg.L, m.cfg.E, D.num_params(m.dcfg, m.cfg), f["n_steps"])
    off = 4 * R.HEADER_WORDS
    for name, dt, cnt in fields:
        x = np.frombuffer(a[off:off + 4 * cnt], dtype="<i4" if dt == np.int32 else "<f4")
        y = np.frombuffer(b[off:off + 4 * cnt], dtype="<i4" if dt == np.int32 else "<f4")
        off += 4 * cnt
        if dt == np.int32 and not np.array_equal(x, y):
            return False, f"integer data '{name}' differs"
        if dt != np.int32 and M.rel_diff(x, y) > 1e-6:
            return False, f"'{name}' differs by {M.rel_diff(x, y):.2e} (relative, > 1e-6)"
    return True, "matches"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="directory to write the fixtures into")
    g.add_argument("--check", help="directory holding the fixtures to compare against")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    if args.out:
        generate_all(args.out, list(FIXTURES))
        print(f"wrote {len(FIXTURES)} fixtures to {args.out} in {time.time() - t0:.1f} s")
        return 0
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        generate_all(tmp, list(FIXTURES), verbose=False)
        for name in FIXTURES:
            for kind in ("model", "ref"):
                fn = f"{name}_{kind}.bin"
                old = os.path.join(args.check, fn)
                ok, msg = compare(os.path.join(tmp, fn), old) if os.path.exists(old) else (False, "missing")
                print(f"{'OK      ' if ok else 'MISMATCH'} {fn}: {msg}")
                bad += not ok
    print(f"{'all DiT fixtures match' if bad == 0 else f'{bad} file(s) missing or different'} "
          f"({time.time() - t0:.1f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
