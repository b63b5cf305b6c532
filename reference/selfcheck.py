"""Self-checks of the PyTorch reference (reference/dtopp_ref.py). Exits non-zero on any failure.

    python3 reference/selfcheck.py

1. finite differences (float64) of the total loss w.r.t. entries of wr, theta, w1, w3, w2, wte, g1,
   g2, gf, wqkv, wo, in several routing configurations, with a check that no routing decision
   changes under the perturbation;
2. the closed-form router derivatives of the specification (section 2) against autograd;
3. the PI controller: anti-windup (p and I frozen while saturated), global and per layer;
4. torch's AdamW against the specification's formula, global-norm clipping, learning-rate schedule;
5. the selection rule on hand-made probabilities (ties, running sum, p = 1 in float32);
6. the sparse expert dispatch against a dense computation of every expert;
7. checkpoint save/load round trip.
"""

import math
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dtopp_ref as R  # noqa: E402

torch.set_num_threads(1)
FAILS = []


def check(name, ok, detail=""):
    print(f"[{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))
    if not ok:
        FAILS.append(name)


def batch(cfg, seed, B=2, T=16):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.V, (B, T), generator=g)
    tg = torch.randint(0, cfg.V, (B, T), generator=g)
    return idx, tg


def loss_and_routing(model, idx, tg):
    rec = []
    with torch.no_grad():
        _, ls = R.forward(model, idx, tg, record=rec)
    sel = np.stack([r["selected"].numpy() for r in rec])
    return float(ls["total"]), sel


# ------------------------------------------------------------------------------------------------
# 1. finite differences

def fd_check(label, cfg, wr_std, seed=0, h=1e-5):
    model = R.init_model(cfg, seed, wr_std=wr_std)
    # move the model off its init so that gains and theta are not all at trivial values
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 100)
        for n in ("g1", "g2", "gf"):
            model.params[n].add_(0.1 * torch.randn(model.params[n].shape, generator=g, dtype=torch.float64))
        model.params["theta"].add_(0.3 * torch.rand(cfg.L, generator=g, dtype=torch.float64))
    idx, tg = batch(cfg, seed + 1)
    rec = []
    model.zero_grad()
    _, ls = R.forward(model, idx, tg, record=rec)
    ls["total"].backward()
    base_sel = np.stack([r["selected"].numpy() for r in rec])
    # choose entries; for expert weights pick an expert that some token selected
    mask0 = rec[-1]["mask"]
    e_used = int(torch.nonzero(mask0.any(0))[0])
    gen = np.random.default_rng(seed)
    L, C, E, H = cfg.L, cfg.C, cfg.E, cfg.H
    tok_in = int(idx[0, 3])
    tok_out = next(t for t in range(cfg.V) if t not in set(idx.flatten().tolist()))
    entries = [
        ("wr", (L - 1, int(gen.integers(E)), int(gen.integers(C)))),
        ("wr", (0, int(gen.integers(E)), int(gen.integers(C)))),
        ("theta", (0,)), ("theta", (L - 1,)),
        ("w1", (L - 1, e_used, int(gen.integers(H)), int(gen.integers(C)))),
        ("w3", (L - 1, e_used, int(gen.integers(H)), int(gen.integers(C)))),
        ("w2", (L - 1, e_used, int(gen.integers(C)), int(gen.integers(H)))),
        ("wte", (tok_in, int(gen.integers(C)))),
        ("wte", (tok_out, int(gen.integers(C)))),
        ("g2", (0, int(gen.integers(C)))), ("g2", (L - 1, int(gen.integers(C)))),
        ("g1", (1, int(gen.integers(C)))), ("gf", (int(gen.integers(C)),)),
        ("wqkv", (0, int(gen.integers(3 * C)), int(gen.integers(C)))),
        ("wo", (L - 1, int(gen.integers(C)), int(gen.integers(C)))),
    ]
    worst = 0.0
    stable = True
    details = []
    for name, ix in entries:
        t = model.params[name]
        ga = 0.0 if t.grad is None else float(t.grad[ix])
        with torch.no_grad():
            orig = float(t[ix])
            t[ix] = orig + h
            lp, sp = loss_and_routing(model, idx, tg)
            t[ix] = orig - h
            lm, sm = loss_and_routing(model, idx, tg)
            t[ix] = orig
        if not (np.array_equal(sp, base_sel) and np.array_equal(sm, base_sel)):
            stable = False
        gn = (lp - lm) / (2 * h)
        # float64 central differences: rounding noise ~ eps*|loss|/h ~ 1e-10 absolute
        err = abs(gn - ga) / (1e-6 * abs(ga) + 1e-9)
        worst = max(worst, err)
        details.append(f"{name}{list(ix)} {ga:+.6e}/{gn:+.6e}")
    check(f"finite differences [{label}] routing unchanged under perturbation", stable)
    check(f"finite differences [{label}] {len(entries)} entries, worst |fd-ad|/(1e-6|ad|+1e-9) = {worst:.2f}",
          worst < 1.0, "; ".join(details) if worst >= 1.0 else "")


# ------------------------------------------------------------------------------------------------
# 2. closed-form router derivatives

def router_derivatives():
    g = torch.Generator().manual_seed(7)
    N, E, D = 12, 8, 5
    for renorm in (1, 0):
        z = (torch.randn(N, E, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
        theta = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        u = (z - mu) / torch.sqrt(var + R.DRN_EPS)
        u.retain_grad()
        zh = theta * u
        zh.retain_grad()
        P = torch.softmax(zh, -1)
        P.retain_grad()
        mask, *_ = R.select_experts(P, "dtopp", p=0.6)
        mf = mask.double()
        Z = (P * mf).sum(-1, keepdim=True)
        G = P * mf / Z if renorm else P * mf
        G.retain_grad()
        expert_out = torch.randn(N, E, D, generator=g, dtype=torch.float64)
        dmoe = torch.randn(N, D, generator=g, dtype=torch.float64)
        out = (G[:, :, None] * expert_out).sum(1)
        # plus an auxiliary-loss-like term that uses the full P
        w_aux = torch.randn(E, generator=g, dtype=torch.float64)
        loss = (out * dmoe).sum() + 0.3 * (P * w_aux).sum()
        loss.backward()
        dg = (dmoe[:, None, :] * expert_out).sum(-1)            # dg_e = <dMoE, Expert_e>
        with torch.no_grad():
            Pd, Zd = P.detach(), Z.detach()
            gd = G.detach()
            if renorm:
                dP = torch.where(mask, (dg - (gd * dg).sum(-1, keepdim=True)) / Zd, torch.zeros_like(dg))
            else:
                dP = torch.where(mask, dg, torch.zeros_like(dg))
            dP = dP + 0.3 * w_aux
            dzh = Pd * (dP - (Pd * dP).sum(-1, keepdim=True))
            dtheta = (dzh * u.detach()).sum()
            du = theta.detach() * dzh
            ud = u.detach()
            dz = (du - du.mean(-1, keepdim=True) - ud * (du * ud).mean(-1, keepdim=True)) / torch.sqrt(var.detach() + R.DRN_EPS)
        tag = "renorm" if renorm else "raw"
        e1 = float((dP - P.grad).abs().max())
        e2 = float((dzh - zh.grad).abs().max())
        e3 = abs(float(dtheta) - float(theta.grad))
        e4 = float((dz - z.grad).abs().max())
        check(f"router derivatives [{tag}] dP (gates), dzhat (softmax), dtheta, dz (DRN) vs autograd",
              max(e1, e2, e3, e4) < 1e-12, f"max abs errors {e1:.1e} {e2:.1e} {e3:.1e} {e4:.1e}")


# ------------------------------------------------------------------------------------------------
# 3. controller

def controller_checks():
    # global: a_t stuck far below the target drives p' above pmax -> p = pmax, I frozen
    cfg = R.Config(L=2, E=8, routing="dtopp", tgt=6.0, Kp=0.3, Ki=0.05, p0=0.5, pmin=0.01, pmax=0.6)
    model = R.init_model(cfg, 0)
    fake = lambda n: [{"n_sel": torch.full((10,), n, dtype=torch.long)} for _ in range(cfg.L)]
    R.controller_update(model, fake(1))       # e = 5/8 -> p' = 0.5 + 0.1875 + 0.03125 > 0.6
    p1, I1 = model.p.clone(), model.I.clone()
    ok = torch.all(p1 == cfg.pmax) and torch.all(I1 == 0)
    for _ in range(5):
        R.controller_update(model, fake(1))
    ok = ok and torch.equal(model.p, p1) and torch.equal(model.I, I1)
    check("controller anti-windup: p stays at pmax and I unchanged while saturated", bool(ok),
          f"p={model.p.tolist()} I={model.I.tolist()}")
    # leaves saturation immediately once the error flips (no wound-up integral)
    R.controller_update(model, fake(7))        # e = -1/8 -> p' = 0.5 - 0.0375 - 0.00625
    exp_p = cfg.p0 + cfg.Kp * (-1 / 8) + cfg.Ki * (-1 / 8)
    check("controller leaves saturation at once when the error flips",
          bool(torch.allclose(model.p, torch.full((2,), exp_p, dtype=torch.float64), atol=1e-15, rtol=0)),
          f"p={model.p.tolist()} expected {exp_p}")
    # in-range update: p = p0 + Kp e + Ki I'
    cfg2 = R.Config(L=2, E=8, routing="dtopp", tgt=3.0)
    m2 = R.init_model(cfg2, 0)
    R.controller_update(m2, fake(2))
    R.controller_update(m2, fake(2))
    e = (cfg2.tgt - 2) / 8
    exp = cfg2.p0 + cfg2.Kp * e + cfg2.Ki * 2 * e
    check("controller in-range PI update", abs(float(m2.p[0]) - exp) < 1e-15 and abs(float(m2.I[0]) - 2 * e) < 1e-15)
    # per layer: layer 0 saturates at pmin, layer 1 stays in range
    cfg3 = R.Config(L=2, E=8, routing="dtopp", controller="layer", tgt=2.0, p0=0.1, pmin=0.05, pmax=1.0)
    m3 = R.init_model(cfg3, 0)
    rec = [{"n_sel": torch.full((10,), 8, dtype=torch.long)}, {"n_sel": torch.full((10,), 2, dtype=torch.long)}]
    for _ in range(3):
        a_t, _ = R.controller_update(m3, rec)
    ok = float(m3.p[0]) == cfg3.pmin and float(m3.I[0]) == 0.0 and float(m3.p[1]) == cfg3.p0 and a_t == 5.0
    check("layer-wise controller: saturated layer frozen, other layer independent", ok,
          f"p={m3.p.tolist()} I={m3.I.tolist()} a_t={a_t}")


# ------------------------------------------------------------------------------------------------
# 4. optimiser, clipping, schedule

def optimiser_checks():
    cfg = R.Config(L=2, E=8, routing="topp", p=0.5, lb_coef=0.01, ent_coef=0.01)
    model = R.init_model(cfg, 3, wr_std=0.2)
    idx, tg = batch(cfg, 5)
    opt = R.make_optimizer(model, weight_decay=R.f32(0.1))
    w = {n: t.detach().clone() for n, t in model.params.items()}
    m = {n: torch.zeros_like(t) for n, t in w.items()}
    v = {n: torch.zeros_like(t) for n, t in w.items()}
    worst = 0.0
    clipped = 0
    for s in range(5):
        lr = R.lr_at(s, 1e-2, 2, 5)
        model.zero_grad()
        _, ls = R.forward(model, idx, tg)
        ls["total"].backward()
        grads = {n: t.grad.detach().clone() for n, t in model.params.items()}
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
        n2 = R.clip_grads(model)
        if norm > 1:
            clipped += 1
            grads = {n: g * (1.0 / norm) for n, g in grads.items()}
        worst = max(worst, abs(n2 - norm) / norm)
        for n in R.PARAM_NAMES:
            worst = max(worst, float((model.params[n].grad - grads[n]).abs().max()))
        opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = lr
        opt.step()
        t = s + 1
        for n in R.PARAM_NAMES:
            wd = R.f32(0.1) if n in R.DECAYED else 0.0
            m[n] = R.BETA1 * m[n] + (1 - R.BETA1) * grads[n]
            v[n] = R.BETA2 * v[n] + (1 - R.BETA2) * grads[n] ** 2
            mh = m[n] / (1 - R.BETA1 ** t)
            vh = v[n] / (1 - R.BETA2 ** t)
            w[n] = w[n] - lr * (mh / (torch.sqrt(vh) + R.ADAM_EPS) + wd * w[n])
            worst = max(worst, float((model.params[n].detach() - w[n]).abs().max()))
    check("torch AdamW + clipping == specification formula (5 steps)", worst < 1e-13,
          f"max abs diff {worst:.1e}, {clipped} of 5 steps clipped")
    lrs = [R.lr_at(s, 1.0, 3, 10) for s in range(10)]
    exp = [1 / 3, 2 / 3, 1.0] + [0.1 + 0.45 * (1 + math.cos(math.pi * (s - 3) / 7)) for s in range(3, 10)]
    check("learning-rate schedule (warm-up then cosine to 0.1 peak)",
          max(abs(a - b) for a, b in zip(lrs, exp)) < 1e-15, " ".join(f"{x:.4f}" for x in lrs))


# ------------------------------------------------------------------------------------------------
# 5. selection rule

def selection_checks():
    P = torch.tensor([[0.125, 0.25, 0.375, 0.25],     # ties 1 and 3 -> 1 first
                      [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    mask, order, Ps, excl, n = R.select_experts(P, "topp", p=0.625)
    # row 0: order 2,1,3,0; excl 0, .375, .625 -> keep 2 (0.625 < 0.625 false)
    ok = order[0].tolist() == [2, 1, 3, 0] and n.tolist() == [2, 3] and order[1].tolist() == [0, 1, 2, 3]
    ok = ok and mask[0].tolist() == [False, True, True, False]
    check("selection: order by P desc, ties by lower index; keep while running sum < p", ok,
          f"order={order.tolist()} n={n.tolist()}")
    mask, order, *_ , n = R.select_experts(P, "topk", k=2)
    check("selection: topk takes the first k in that order", mask.tolist() ==
          [[False, True, True, False], [True, True, False, False]])
    # p = 1 in float32: once the running sum rounds to 1 the rest are dropped
    # exact float32 values summing to 1; in float32 0.75 + (0.25 - 2^-25) rounds to 1.0
    Pf = torch.tensor([[0.75, 2.0 ** -26, 2.0 ** -26, 0.25 - 2.0 ** -25]], dtype=torch.float32)
    *_, n32 = R.select_experts(Pf, "topp", p=1.0)
    *_, n64 = R.select_experts(Pf.double(), "topp", p=1.0)
    check("selection: running sum in working precision (p=1, float32 drops the tail)",
          int(n32[0]) < int(n64[0]), f"float32 |S|={int(n32[0])}, float64 |S|={int(n64[0])}")


# ------------------------------------------------------------------------------------------------
# 6. dispatch vs dense

def dispatch_check():
    for routing, renorm in (("dtopp", 1), ("topk", 1), ("dtopp", 0)):
        cfg = R.Config(L=2, E=8, routing=routing, renorm=renorm, k=3, p0=0.6)
        model = R.init_model(cfg, 11, wr_std=0.5)
        g = torch.Generator().manual_seed(1)
        m = torch.randn(40, cfg.C, generator=g, dtype=torch.float64)
        l = 1
        prm = model.params
        params_l = {"wr": prm["wr"][l], "theta": prm["theta"][l], "w1": list(prm["w1"][l]),
                    "w3": list(prm["w3"][l]), "w2": list(prm["w2"][l])}
        rec = []
        with torch.no_grad():
            out, LB, Hh = R.moe_layer(m, params_l, cfg, 0.6, rec)
            P = rec[0]["P"]
            mask = rec[0]["mask"]
            G = torch.where(mask, P, torch.zeros_like(P))
            if renorm:
                G = G / G.sum(-1, keepdim=True)
            dense = torch.zeros_like(m)
            for e in range(cfg.E):
                h = torch.nn.functional.silu(m @ prm["w1"][l, e].t()) * (m @ prm["w3"][l, e].t())
                dense += G[:, e:e + 1] * (h @ prm["w2"][l, e].t())
            f = mask.double().sum(0) / mask.sum()
            LB2 = cfg.E * (f * P.mean(0)).sum()
            H2 = -(P * torch.log(P)).sum(-1).mean()
        err = float((out - dense).abs().max())
        check(f"sparse dispatch == dense masked computation [{routing}, renorm={renorm}]",
              err < 1e-14 and abs(float(LB - LB2)) < 1e-14 and abs(float(Hh - H2)) < 1e-14,
              f"max abs diff {err:.1e}")


# ------------------------------------------------------------------------------------------------
# 7. checkpoint round trip

def checkpoint_check():
    cfg = R.Config(L=2, E=8, routing="dtopp", controller="layer", tgt=3.0, theta_init=1.3)
    model = R.init_model(cfg, 4)
    model.p[:] = torch.tensor([0.3, 0.7], dtype=torch.float64).float().double()
    model.I[:] = torch.tensor([0.1, -0.2], dtype=torch.float64).float().double()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.bin")
        R.save_model(model, path)
        size = os.path.getsize(path)
        m2 = R.load_model(path)
    ok = size == 1024 + 4 * R.num_params(cfg) + 8 * cfg.L
    ok = ok and m2.cfg == cfg and np.array_equal(m2.flat_params(), model.flat_params())
    ok = ok and torch.equal(m2.p, model.p) and torch.equal(m2.I, model.I)
    ok = ok and bool(torch.all(model.params["wte"][cfg.V:] == 0))
    check("checkpoint save/load round trip (exact), padded wte rows zero", ok, f"{size} bytes")


def main():
    fd_check("dtopp global, DRN, renorm", R.Config(routing="dtopp", drn=1, renorm=1, p0=0.6,
                                                    lb_coef=0.05, ent_coef=0.05), wr_std=0.3)
    fd_check("dtopp, DRN, raw gates", R.Config(routing="dtopp", drn=1, renorm=0, p0=0.6,
                                               lb_coef=0.05, ent_coef=0.05), wr_std=0.3, seed=2)
    fd_check("topp, no DRN", R.Config(routing="topp", drn=0, renorm=1, p=0.5,
                                      lb_coef=0.05, ent_coef=0.05), wr_std=0.3, seed=4)
    fd_check("topk k=2, no DRN", R.Config(routing="topk", drn=0, renorm=1, k=2,
                                          lb_coef=0.05, ent_coef=0.0), wr_std=0.3, seed=6)
    router_derivatives()
    controller_checks()
    optimiser_checks()
    selection_checks()
    dispatch_check()
    checkpoint_check()
    if FAILS:
        print(f"{len(FAILS)} check(s) FAILED")
        sys.exit(1)
    print("all self-checks passed")


if __name__ == "__main__":
    main()
