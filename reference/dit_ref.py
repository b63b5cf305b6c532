"""Independent PyTorch reference of the DTop-p diffusion transformer (train_dit.c, doc/dit.md).

A class-conditional DiT with adaLN-Zero on 4 x 4 patches of 28 x 28 images, whose blocks route
through the MoE layer of dtopp_ref.py (router, DRN, top-k / top-p / DTop-p selection, auxiliary
losses), trained with the rectified-flow objective. Written from doc/dit.md; every gradient comes
from autograd. File formats: doc/formats.md.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import dtopp_ref as R

DIT_MAGIC, DIT_VERSION = 20251217, 1
FIXTURE_MAGIC, FIXTURE_VERSION = 20251218, 1

TENSORS = ["wpatch", "wt1", "wt2", "wy", "wada", "g1", "wqkv", "wo", "g2", "wr", "theta", "w1", "w3", "w2",
           "gf", "wfinal", "wout"]
NOT_DECAYED = {"g1", "g2", "theta", "gf"}   # weight decay on every matrix, none on gains and theta


@dataclass
class DitConfig:
    image_size: int = 28
    patch_size: int = 4
    num_classes: int = 10

    @property
    def grid(self):
        return self.image_size // self.patch_size


def trunk_config(d, **routing):
    """The transformer's configuration, as dtopp_ref.Config: patches for tokens (T = grid^2,
    V = P^2 values per patch)."""
    PP = d.patch_size ** 2
    return R.Config(max_seq_len=d.grid ** 2, V=PP, Vp=R.pad_vocab(PP), **routing)


def shapes(d, cfg):
    L, C, E, H, PP = cfg.L, cfg.C, cfg.E, cfg.H, d.patch_size ** 2
    return {"wpatch": (C, PP), "wt1": (C, C), "wt2": (C, C), "wy": (d.num_classes + 1, C),
            "wada": (L, 6 * C, C), "g1": (L, C), "wqkv": (L, 3 * C, C), "wo": (L, C, C), "g2": (L, C),
            "wr": (L, E, C), "theta": (L,), "w1": (L, E, H, C), "w3": (L, E, H, C), "w2": (L, E, C, H),
            "gf": (C,), "wfinal": (2 * C, C), "wout": (PP, C)}


def num_params(d, cfg):
    return sum(math.prod(s) for s in shapes(d, cfg).values())


class DitModel:
    """Parameters (name -> leaf tensor) and the controller state p[L], I[L] (float64). It has the
    fields dtopp_ref's controller_update and clip_grads use (cfg, params, p, I)."""

    def __init__(self, dcfg, cfg, params, p_state=None, i_state=None):
        self.dcfg, self.cfg, self.params = dcfg, cfg, params
        if p_state is None:
            p_state, i_state = R.initial_controller_state(cfg)
        self.p = torch.as_tensor(p_state, dtype=torch.float64).clone().reshape(cfg.L)
        self.I = torch.as_tensor(i_state, dtype=torch.float64).clone().reshape(cfg.L)

    def flat_params(self):
        return np.concatenate([self.params[n].detach().double().numpy().ravel() for n in TENSORS])

    def flat_grads(self):
        return np.concatenate([(torch.zeros_like(self.params[n]) if self.params[n].grad is None
                                else self.params[n].grad).detach().double().numpy().ravel() for n in TENSORS])

    def zero_grad(self):
        for t in self.params.values():
            t.grad = None


def init_model(dcfg, cfg, seed, std=0.05, wr_std=0.1):
    """Every matrix normal(0, std) (the router's wr_std), gains 1, theta = theta_init, rounded to
    float32. Unlike the training program's adaLN-Zero start, nothing is zero, so that every
    gradient of a test is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in shapes(dcfg, cfg).items():
        if name in ("g1", "g2", "gf"):
            t = torch.ones(shape)
        elif name == "theta":
            t = torch.full(shape, cfg.theta_init)
        else:
            s = wr_std if name == "wr" else std
            t = torch.normal(0.0, 1.0, size=shape, generator=gen, dtype=torch.float64) * s
        params[name] = t.to(torch.float32).to(torch.float64).requires_grad_(True)
    return DitModel(dcfg, cfg, params)


# ----------------------------------------------------------------------------------------------
# forward pass

def patchify(x, d):
    """(B, S, S) -> (B, T, P*P): patch (gy, gx) is token gy*grid + gx, its pixels row by row."""
    B, G, P = x.shape[0], d.grid, d.patch_size
    return x.reshape(B, G, P, G, P).permute(0, 1, 3, 2, 4).reshape(B, G * G, P * P)


def unpatchify(x, d):
    B, G, P = x.shape[0], d.grid, d.patch_size
    return x.reshape(B, G, G, P, P).permute(0, 1, 3, 2, 4).reshape(B, G * P, G * P)


def position_embedding(grid, C):
    """(T, C): for the patch in column gx, row gy: sin(gx w_i), cos(gx w_i), sin(gy w_i), cos(gy w_i),
    C/4 channels each, w_i = 10000^(-i/(C/4)); float64, rounded to float32 as the C code keeps it."""
    q = C // 4
    w = 10000.0 ** (-np.arange(q) / q)
    n = np.arange(grid * grid)
    parts = []
    for coord in (n % grid, n // grid):
        ang = coord[:, None] * w[None, :]
        parts += [np.sin(ang), np.cos(ang)]
    return torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32).astype(np.float64))


def time_features(t, C):
    """(B, C): cos(1000 t f_i), then sin(1000 t f_i), f_i = 10000^(-i/(C/2)); rounded to float32."""
    half = C // 2
    f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    ang = 1000.0 * t.double()[:, None] * f[None, :]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).float().double()


def modulate(x, shift, scale):
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def attention(a, wqkv, wo, cfg):
    """Softmax attention of every patch on every patch of its image (no mask, no RoPE)."""
    B, T, C = a.shape
    q, k, v = (a @ wqkv.t()).split(C, dim=-1)
    q, k, v = (z.view(B, T, cfg.NH, cfg.hd).transpose(1, 2) for z in (q, k, v))
    att = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(cfg.hd), dim=-1)
    return (att @ v).transpose(1, 2).reshape(B, T, C) @ wo.t()


def forward(model, xt, t, labels, target=None, record=None):
    """The predicted velocity (B, S, S) of noisy images xt (B, S, S) at times t (B) of classes labels
    (B; num_classes is the null class); with a target velocity, also the losses."""
    d, cfg, prm = model.dcfg, model.cfg, model.params
    B, C = xt.shape[0], cfg.C
    T = d.grid ** 2
    x = patchify(xt, d) @ prm["wpatch"].t() + position_embedding(d.grid, C)[None]
    cond = F.silu(time_features(t, C) @ prm["wt1"].t()) @ prm["wt2"].t() + prm["wy"][labels]
    c = F.silu(cond)
    LBs, Hs = [], []
    for l in range(cfg.L):
        shift1, scale1, gate1, shift2, scale2, gate2 = (c @ prm["wada"][l].t()).chunk(6, dim=-1)
        a = modulate(R.rmsnorm(x, prm["g1"][l]), shift1, scale1)
        x = x + gate1[:, None, :] * attention(a, prm["wqkv"][l], prm["wo"][l], cfg)
        m = modulate(R.rmsnorm(x, prm["g2"][l]), shift2, scale2)
        layer = {"wr": prm["wr"][l], "theta": prm["theta"][l], "w1": prm["w1"][l], "w3": prm["w3"][l],
                 "w2": prm["w2"][l]}
        y, LB, H = R.moe_layer(m.reshape(B * T, C), layer, cfg, float(model.p[l]), record)
        x = x + gate2[:, None, :] * y.view(B, T, C)
        LBs.append(LB)
        Hs.append(H)
    shift, scale = (c @ prm["wfinal"].t()).chunk(2, dim=-1)
    v = unpatchify(modulate(R.rmsnorm(x, prm["gf"]), shift, scale) @ prm["wout"].t(), d)
    if target is None:
        return v, None
    mse = ((v - target) ** 2).mean()
    LBv, Hv = torch.stack(LBs), torch.stack(Hs)
    total = mse + cfg.lb_coef * LBv.mean() + cfg.ent_coef * Hv.mean()
    return v, {"total": total, "mse": mse, "LB": LBv, "H": Hv}


@torch.no_grad()
def sample(model, x, labels, steps, guidance, records=None):
    """Euler steps of dx/dt = v from t = 1 to 0 from the noise x (B, S, S), with classifier-free
    guidance: v = v(null) + guidance (v(class) - v(null)) from the doubled batch. The times are
    float32 values, as the C code computes them. records (a list) receives each step's routing."""
    B, K = x.shape[0], model.dcfg.num_classes
    classes = torch.cat([labels, torch.full_like(labels, K)])
    for i in range(steps):
        t, t_next = R.f32(1.0 - R.f32(i / steps)), R.f32(1.0 - R.f32((i + 1) / steps))
        record = [] if records is not None else None
        v, _ = forward(model, torch.cat([x, x]), torch.full((2 * B,), t, dtype=torch.float64), classes,
                       record=record)
        if records is not None:
            records.append(record)
        x = x + (t_next - t) * (v[B:] + guidance * (v[:B] - v[B:]))
    return x


def rectified_flow_pair(x0, noise, t):
    """x_t = (1 - t) x0 + t noise and its velocity noise - x0."""
    tt = t.double()[:, None, None]
    return (1.0 - tt) * x0 + tt * noise, noise - x0


# ----------------------------------------------------------------------------------------------
# training

def make_optimizer(model, weight_decay=R.f32(0.1)):
    decay = [model.params[n] for n in TENSORS if n not in NOT_DECAYED]
    nodecay = [model.params[n] for n in TENSORS if n in NOT_DECAYED]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": nodecay, "weight_decay": 0.0}],
                             lr=1e-3, betas=(R.BETA1, R.BETA2), eps=R.ADAM_EPS)


def train_step(model, opt, xt, t, labels, target, lr):
    """Forward, backward, clipping, AdamW, controller update (as dtopp_ref.train_step)."""
    record = []
    model.zero_grad()
    _, losses = forward(model, xt, t, labels, target, record=record)
    losses["total"].backward()
    for p in model.params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    norm = R.clip_grads(model)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    a_t, p_pre = R.controller_update(model, record)
    return {"loss": losses["total"].item(), "a_t": a_t, "grad_norm": norm, "p_pre": p_pre, "record": record}


# ----------------------------------------------------------------------------------------------
# files

def save_model(model, path):
    d, cfg = model.dcfg, model.cfg
    h = np.zeros(R.HEADER_WORDS, dtype=np.int32)
    h[0], h[1] = DIT_MAGIC, DIT_VERSION
    h[2:15] = [cfg.max_seq_len, cfg.V, cfg.Vp, cfg.L, cfg.NH, cfg.C, cfg.E, cfg.H, R.ROUTING[cfg.routing],
               R.CONTROLLER[cfg.controller], cfg.drn, cfg.renorm, cfg.k]
    for i, name in enumerate(R.Config.FLOAT_FIELDS):
        R._set_f32(h, 32 + i, getattr(cfg, name))
    h[64:67] = [d.image_size, d.patch_size, d.num_classes]
    payload = np.concatenate([model.flat_params(), model.p.numpy(), model.I.numpy()])
    with open(path, "wb") as f:
        f.write(h.astype("<i4").tobytes())
        f.write(payload.astype("<f4").tobytes())


def load_model(path):
    raw, h = R.read_header(path, DIT_MAGIC, DIT_VERSION, "diffusion transformer checkpoint")
    d = DitConfig(int(h[64]), int(h[65]), int(h[66]))
    routing = dict(L=int(h[5]), NH=int(h[6]), C=int(h[7]), E=int(h[8]), H=int(h[9]),
                   routing=R.ROUTING_NAMES[int(h[10])], controller=R.CONTROLLER_NAMES[int(h[11])],
                   drn=int(h[12]), renorm=int(h[13]), k=int(h[14]))
    routing.update({name: R._get_f32(h, 32 + i) for i, name in enumerate(R.Config.FLOAT_FIELDS)})
    cfg = trunk_config(d, **routing)
    n = num_params(d, cfg)
    expect = 4 * R.HEADER_WORDS + 4 * (n + 2 * cfg.L)
    if len(raw) != expect:
        raise ValueError(f"{path}: size {len(raw)} bytes, expected {expect}")
    data = np.frombuffer(raw[4 * R.HEADER_WORDS:], dtype="<f4").astype(np.float64)
    params, off = {}, 0
    for name, shape in shapes(d, cfg).items():
        cnt = math.prod(shape)
        params[name] = torch.from_numpy(data[off:off + cnt].copy()).reshape(shape).requires_grad_(True)
        off += cnt
    return DitModel(d, cfg, params, data[off:off + cfg.L], data[off + cfg.L:off + 2 * cfg.L])


def fixture_layout(B, d, L, E, n_params, n_steps):
    """(name, dtype, count) of a DiT fixture's payload, in order (the sample is last)."""
    D, N = d.image_size ** 2, B * d.grid ** 2
    return [("x0", np.float32, B * D), ("noise", np.float32, B * D), ("t", np.float32, B),
            ("labels", np.int32, B), ("velocity", np.float32, B * D), ("losses", np.float32, 2 + 2 * L),
            ("n_selected", np.int32, L * N), ("selected", np.int32, L * N * E),
            ("gates", np.float32, L * N * E),
            ("grads", np.float32, n_params), ("trajectory", np.float32, n_steps * (2 + L)),
            ("sample", np.float32, B * D)]


def save_fixture(path, model, B, n_steps, warmup, lr, weight_decay, sample_steps, guidance, arrays):
    d, cfg = model.dcfg, model.cfg
    h = np.zeros(R.HEADER_WORDS, dtype=np.int32)
    h[0], h[1] = FIXTURE_MAGIC, FIXTURE_VERSION
    h[2:12] = [B, d.image_size, d.patch_size, d.num_classes, cfg.L, cfg.E, num_params(d, cfg), n_steps,
               warmup, sample_steps]
    R._set_f32(h, 32, lr)
    R._set_f32(h, 33, weight_decay)
    R._set_f32(h, 34, guidance)
    with open(path, "wb") as f:
        f.write(h.astype("<i4").tobytes())
        for name, dt, cnt in fixture_layout(B, d, cfg.L, cfg.E, num_params(d, cfg), n_steps):
            a = np.asarray(arrays[name]).ravel()
            assert a.size == cnt, (name, a.size, cnt)
            f.write(a.astype("<i4" if dt == np.int32 else "<f4").tobytes())


def load_fixture(path):
    raw, h = R.read_header(path, FIXTURE_MAGIC, FIXTURE_VERSION, "diffusion transformer fixture")
    B, S, P, K, L, E, n_params, n_steps, warmup = (int(x) for x in h[2:11])
    layout = fixture_layout(B, DitConfig(S, P, K), L, E, n_params, n_steps)
    if len(raw) != 4 * R.HEADER_WORDS + 4 * sum(c for _, _, c in layout):
        raise ValueError(f"{path}: wrong size {len(raw)}")
    out, off = {"B": B, "L": L, "n_steps": n_steps}, 4 * R.HEADER_WORDS
    for name, dt, cnt in layout:
        out[name] = np.frombuffer(raw[off:off + 4 * cnt], dtype="<i4" if dt == np.int32 else "<f4").copy()
        off += 4 * cnt
    return out
