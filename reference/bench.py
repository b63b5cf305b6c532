"""Run the PyTorch reference on any device/dtype: agreement with a fixture, and training speed.

    python3 reference/bench.py --fixture test/fixtures/dtopp          # float32 vs the float64 fixture
    python3 reference/bench.py --device cuda --L 8 --C 512 --E 32 --H 256 --B 8 --T 512 --steps 20

The speed run builds a fresh model (section 5 init) with random tokens, and reports ms per full
training step (forward, backward, clipping, AdamW, controller) and tokens per second.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dtopp_ref as R  # noqa: E402


def fixture_agreement(prefix, device, dtype):
    model = R.load_model(prefix + "_model.bin", dtype=dtype, device=device)
    ref = R.load_ref(prefix + "_ref.bin")
    B, T = ref["B"], ref["T"]
    idx = torch.from_numpy(ref["inputs"].astype(np.int64)).view(B, T).to(device)
    tgt = torch.from_numpy(ref["targets"].astype(np.int64)).view(B, T).to(device)
    rec = []
    logits, losses = R.forward(model, idx, tgt, record=rec)
    losses["total"].backward()
    dec = R.routing_decisions(rec, model.cfg)
    lg = logits.detach().double().cpu().numpy().ravel()
    d_logits = np.abs(lg - ref["logits"]).max() / np.abs(ref["logits"]).max()
    g = model.flat_grads()
    d_grads = np.abs(g - ref["grads"]).max() / np.abs(ref["grads"]).max()
    same_sel = np.array_equal(dec["selected"].ravel(), ref["selected"])
    print(f"{os.path.basename(prefix)} [{device} {dtype}]: loss {losses['total'].item():.6f} "
          f"(ref {ref['losses'][0]:.6f}), logits rel {d_logits:.1e}, grads rel {d_grads:.1e}, "
          f"selection identical {same_sel}")
    # trajectory
    model = R.load_model(prefix + "_model.bin", dtype=dtype, device=device)
    opt = R.make_optimizer(model, weight_decay=ref["weight_decay"])
    traj = ref["trajectory"].reshape(ref["n_steps"], -1)
    worst_loss, worst_p, same_a = 0.0, 0.0, True
    for s in range(ref["n_steps"]):
        st = R.train_step(model, opt, idx, tgt, R.lr_at(s, ref["lr"], ref["warmup"], ref["n_steps"]))
        worst_loss = max(worst_loss, abs(st["loss"] - traj[s, 0]) / abs(traj[s, 0]))
        worst_p = max(worst_p, float(np.abs(model.p.numpy() - traj[s, 2:]).max()))
        same_a = same_a and abs(st["a_t"] - traj[s, 1]) < 1e-6
    print(f"    trajectory: loss rel {worst_loss:.1e}, a_t identical {same_a}, p abs {worst_p:.1e}")


def speed(args):
    cfg = R.Config(max_seq_len=args.T, V=args.V, Vp=R.pad_vocab(args.V), L=args.L, NH=args.NH, C=args.C,
                   E=args.E, H=args.H, routing=args.routing, controller="global", drn=int(args.routing == "dtopp"),
                   tgt=args.tgt, k=args.k, p=0.5, theta_init=1.0, lb_coef=1e-4,
                   ent_coef=0.0 if args.routing == "topk" else 1e-3)
    dtype = getattr(torch, args.dtype)
    model = R.init_model(cfg, 0, dtype=dtype, device=args.device)
    opt = R.make_optimizer(model)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.V, (args.B, args.T), generator=g).to(args.device)
    tgt = torch.randint(0, cfg.V, (args.B, args.T), generator=g).to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = []
    for s in range(args.steps):
        sync()
        t0 = time.time()
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast):
            st = R.train_step(model, opt, idx, tgt, R.lr_at(s, 3e-4, 2, args.steps))
        sync()
        times.append(time.time() - t0)
        if s % max(1, args.steps // 5) == 0:
            print(f"step {s}: loss {st['loss']:.4f} a_t {st['a_t']:.3f} p {float(model.p[0]):.4f} "
                  f"{1000 * times[-1]:.1f} ms")
    warm = times[min(3, len(times) - 1):]
    ms = 1000 * sum(warm) / len(warm)
    kind = f"{args.dtype} + bf16 autocast" if args.autocast else args.dtype
    print(f"{args.device} {kind} L={cfg.L} C={cfg.C} E={cfg.E} H={cfg.H} B={args.B} T={args.T} "
          f"params={R.num_params(cfg)}: {ms:.1f} ms/step, {args.B * args.T / ms * 1000:.0f} tokens/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", nargs="*", help="fixture prefixes (path without _model.bin)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    for name, val in dict(L=4, NH=4, C=256, E=16, H=128, V=50257, B=4, T=256, steps=10, k=2).items():
        ap.add_argument(f"--{name}", type=int, default=val)
    ap.add_argument("--tgt", type=float, default=4.0)
    ap.add_argument("--autocast", action="store_true", help="torch.autocast to bfloat16 around the training step")
    ap.add_argument("--routing", default="dtopp", choices=list(R.ROUTING))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.fixture:
        for f in args.fixture:
            fixture_agreement(f, args.device, getattr(torch, args.dtype))
    else:
        speed(args)


if __name__ == "__main__":
    main()
