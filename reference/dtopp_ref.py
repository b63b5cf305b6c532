"""Independent PyTorch reference of the DTop-p Mixture-of-Experts model.

Written from the specification (sections 1-5): an OLMoE-style decoder whose MoE layers route each
token with top-k, fixed top-p or PI-controlled dynamic top-p (DTop-p), optionally with Dynamic
Routing Normalization (DRN). Every gradient comes from autograd; nothing here has a hand-written
backward pass. The code works in any dtype and on any device: float64 on the CPU for the test
fixtures, float32 on a GPU for speed comparisons.

File formats (model checkpoint, reference fixture) follow doc/formats.md.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# constants of the file formats

MODEL_MAGIC, MODEL_VERSION = 20251213, 1
REF_MAGIC, REF_VERSION = 20251215, 1
HEADER_WORDS = 256

ROUTING = {"topk": 0, "topp": 1, "dtopp": 2}
ROUTING_NAMES = {v: k for k, v in ROUTING.items()}
CONTROLLER = {"global": 0, "layer": 1}
CONTROLLER_NAMES = {v: k for k, v in CONTROLLER.items()}

PARAM_NAMES = ["wte", "g1", "wqkv", "wo", "g2", "wr", "theta", "w1", "w3", "w2", "gf"]
DECAYED = {"wte", "wqkv", "wo", "wr", "w1", "w3", "w2"}   # weight decay only on the matrices

RMS_EPS = 1e-5
DRN_EPS = 1e-5
ROPE_BASE = 10000.0

# AdamW and clipping constants (specification section 5)
BETA1, BETA2, ADAM_EPS = 0.9, 0.95, 1e-8
CLIP_NORM = 1.0


def f32(x):
    """Round a Python number to the nearest float32 (returned as a Python float)."""
    return float(np.float32(x))


def pad_vocab(V, multiple=128):
    return ((V + multiple - 1) // multiple) * multiple


# ----------------------------------------------------------------------------------------------
# configuration

@dataclass
class Config:
    max_seq_len: int = 64
    V: int = 300
    Vp: int = 384
    L: int = 2
    NH: int = 2
    C: int = 32
    E: int = 8
    H: int = 32
    routing: str = "dtopp"        # topk | topp | dtopp
    controller: str = "global"    # global | layer (dtopp only)
    drn: int = 1
    renorm: int = 1
    k: int = 2
    # float32 header fields (always kept as exactly representable float32 values)
    tgt: float = 4.0
    Kp: float = 0.3
    Ki: float = 0.05
    p0: float = 0.5
    pmin: float = 0.01
    pmax: float = 1.0
    theta_init: float = 1.0
    lb_coef: float = 1e-4
    ent_coef: float = 1e-3
    p: float = 0.5

    FLOAT_FIELDS = ("tgt", "Kp", "Ki", "p0", "pmin", "pmax", "theta_init", "lb_coef", "ent_coef", "p")

    def __post_init__(self):
        # the checkpoint stores these as float32: use exactly those values everywhere
        for name in self.FLOAT_FIELDS:
            setattr(self, name, f32(getattr(self, name)))
        assert self.routing in ROUTING, self.routing
        assert self.controller in CONTROLLER, self.controller
        assert self.C % self.NH == 0 and (self.C // self.NH) % 2 == 0
        assert self.Vp >= self.V

    @property
    def hd(self):
        return self.C // self.NH


def param_shapes(cfg):
    L, C, E, H = cfg.L, cfg.C, cfg.E, cfg.H
    return {
        "wte": (cfg.Vp, C),
        "g1": (L, C),
        "wqkv": (L, 3 * C, C),
        "wo": (L, C, C),
        "g2": (L, C),
        "wr": (L, E, C),
        "theta": (L,),
        "w1": (L, E, H, C),
        "w3": (L, E, H, C),
        "w2": (L, E, C, H),
        "gf": (C,),
    }


def num_params(cfg):
    return sum(math.prod(s) for s in param_shapes(cfg).values())


# ----------------------------------------------------------------------------------------------
# the model state: parameters + controller state

class Model:
    """Parameters (dict name -> leaf tensor of the shape in doc/formats.md) and controller state.

    The controller state is a vector p[L] and I[L] (float64 on the CPU, whatever the model dtype):
    with the global controller all layers hold the same value.
    """

    def __init__(self, cfg, params, p_state=None, i_state=None):
        self.cfg = cfg
        self.params = params
        L = cfg.L
        if p_state is None:
            p_state, i_state = initial_controller_state(cfg)
        self.p = torch.as_tensor(p_state, dtype=torch.float64).clone().reshape(L)
        self.I = torch.as_tensor(i_state, dtype=torch.float64).clone().reshape(L)

    def to(self, dtype=None, device=None):
        params = {n: t.detach().to(dtype=dtype, device=device).requires_grad_(True)
                  for n, t in self.params.items()}
        return Model(self.cfg, params, self.p, self.I)

    @property
    def dtype(self):
        return self.params["wte"].dtype

    @property
    def device(self):
        return self.params["wte"].device

    def flat_params(self):
        """All parameters as one float64 numpy array in the order of doc/formats.md."""
        return np.concatenate([self.params[n].detach().double().cpu().numpy().ravel()
                               for n in PARAM_NAMES])

    def flat_grads(self):
        out = []
        for n in PARAM_NAMES:
            t = self.params[n]
            g = torch.zeros_like(t) if t.grad is None else t.grad
            out.append(g.detach().double().cpu().numpy().ravel())
        return np.concatenate(out)

    def zero_grad(self):
        for t in self.params.values():
            t.grad = None


def initial_controller_state(cfg):
    L = cfg.L
    if cfg.routing == "dtopp":
        p = [cfg.p0] * L
    elif cfg.routing == "topp":
        p = [cfg.p] * L
    else:
        p = [0.0] * L
    return torch.tensor(p, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)


def init_model(cfg, seed, dtype=torch.float64, device="cpu", wr_std=0.02, std=0.02):
    """A fresh model (specification section 5) drawn from a CPU torch.Generator seeded by `seed`.

    The draws are rounded to float32 first, so the model is exactly what its float32 checkpoint
    holds. `wr_std` overrides the router's standard deviation (the specification's default is
    0.02, which makes the router almost uniform); theta starts at cfg.theta_init.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    shapes = param_shapes(cfg)
    L = cfg.L
    proj_std = std / math.sqrt(2 * L)
    params = {}
    for name in PARAM_NAMES:
        shape = shapes[name]
        if name in ("g1", "g2", "gf"):
            t = torch.ones(shape, dtype=torch.float32)
        elif name == "theta":
            t = torch.full(shape, cfg.theta_init, dtype=torch.float32)
        else:
            s = {"wo": proj_std, "w2": proj_std, "wr": wr_std}.get(name, std)
            t = torch.normal(0.0, 1.0, size=shape, generator=gen, dtype=torch.float64) * s
            t = t.to(torch.float32)
            if name == "wte":
                t[cfg.V:] = 0.0
        params[name] = t.to(dtype=dtype, device=device).requires_grad_(True)
    return Model(cfg, params)


# ----------------------------------------------------------------------------------------------
# forward pass

def rmsnorm(x, g):
    return g * (x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + RMS_EPS))


def rope_tables(T, hd, dtype, device):
    """cos/sin of shape (T, hd/2): frequencies and angles in float64, then cast."""
    half = hd // 2
    freqs = torch.tensor([ROPE_BASE ** (-2.0 * i / hd) for i in range(half)], dtype=torch.float64)
    pos = torch.arange(T, dtype=torch.float64)
    ang = pos[:, None] * freqs[None, :]
    return torch.cos(ang).to(dtype=dtype, device=device), torch.sin(ang).to(dtype=dtype, device=device)


def apply_rope(x, cos, sin):
    # x: (B, NH, T, hd), rotate-half pairing (i, i + hd/2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention(a, wqkv, wo, cfg, cos, sin):
    B, T, C = a.shape
    NH, hd = cfg.NH, cfg.hd
    qkv = a @ wqkv.t()                                   # (B, T, 3C)
    q, k, v = qkv.split(C, dim=-1)
    q = q.view(B, T, NH, hd).transpose(1, 2)
    k = k.view(B, T, NH, hd).transpose(1, 2)
    v = v.view(B, T, NH, hd).transpose(1, 2)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    if a.is_cuda and hasattr(F, "scaled_dot_product_attention"):
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # scale 1/sqrt(hd)
    else:
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
        att = att.masked_fill(~causal, float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = att @ v
    y = y.transpose(1, 2).reshape(B, T, C)
    return y @ wo.t()


def router_probs(m, wr, theta, drn):
    """Router logits -> (optional DRN) -> probabilities. Returns P, log P, z, u (u None if no DRN)."""
    z = m @ wr.t()                                       # (N, E)
    if drn:
        mu = z.mean(dim=-1, keepdim=True)
        var = ((z - mu) ** 2).mean(dim=-1, keepdim=True)  # biased variance over the experts
        u = (z - mu) / torch.sqrt(var + DRN_EPS)
        zh = theta * u
    else:
        u = None
        zh = z
    logP = torch.log_softmax(zh, dim=-1)
    P = torch.softmax(zh, dim=-1)
    return P, logP, z, u


@torch.no_grad()
def select_experts(P, mode, p=None, k=None):
    """Selection S from (detached) probabilities P (N, E).

    Returns (mask (N,E) bool, order (N,E) long: experts by P descending, ties by lower index,
    sorted P (N,E), exclusive running sums (N,E) in the working precision, n_sel (N,) long).
    For topk the running sums are still returned (not used for the decision).
    """
    P = P.detach()
    N, E = P.shape
    Ps, order = torch.sort(P, dim=-1, descending=True, stable=True)
    # exclusive running sum, accumulated one expert at a time in the working precision
    excl = torch.empty_like(Ps)
    run = torch.zeros(N, dtype=P.dtype, device=P.device)
    for j in range(E):
        excl[:, j] = run
        run = run + Ps[:, j]
    if mode == "topk":
        keep_sorted = torch.zeros(N, E, dtype=torch.bool, device=P.device)
        keep_sorted[:, :k] = True
    else:
        keep_sorted = excl < p                            # a prefix, since excl is non-decreasing
    n_sel = keep_sorted.sum(dim=-1)
    mask = torch.zeros(N, E, dtype=torch.bool, device=P.device)
    mask.scatter_(1, order, keep_sorted)
    return mask, order, Ps, excl, n_sel


def moe_layer(m, params_l, cfg, p_l, record):
    """One MoE layer on m (N, C). params_l: dict of this layer's tensors (expert lists for w1/w3/w2)."""
    N, C = m.shape
    E = cfg.E
    P, logP, z, u = router_probs(m, params_l["wr"], params_l["theta"], cfg.drn)
    mode = cfg.routing
    mask, order, Ps, excl, n_sel = select_experts(P, mode, p=p_l, k=cfg.k)
    maskf = mask.to(P.dtype)
    if cfg.renorm:
        Z = (P * maskf).sum(dim=-1, keepdim=True)
        G = P * maskf / Z
    else:
        G = P * maskf

    # dropless dispatch: for each expert, gather the rows of its tokens, SwiGLU, scatter-add back
    exp_ids, tok_ids = mask.t().nonzero(as_tuple=True)   # sorted by expert, then token
    counts = mask.sum(dim=0).tolist()
    xs = m.index_select(0, tok_ids)
    gs = G[tok_ids, exp_ids]
    ys = []
    start = 0
    for e in range(E):
        c = counts[e]
        if c == 0:
            continue
        xe = xs[start:start + c]
        h = F.silu(xe @ params_l["w1"][e].t()) * (xe @ params_l["w3"][e].t())
        ys.append(h @ params_l["w2"][e].t())
        start += c
    out = torch.zeros_like(m)
    if ys:
        Y = torch.cat(ys, dim=0) * gs[:, None]
        out = out.index_add(0, tok_ids, Y.to(out.dtype))  # under bf16 autocast: combined in float32

    # auxiliary losses (section 4): f is a constant
    n_e = mask.sum(dim=0).to(P.dtype)
    f = (n_e / n_e.sum()).detach()
    LB = E * (f * P.mean(dim=0)).sum()
    Hent = (-(P * logP).sum(dim=-1)).mean()

    if record is not None:
        sel = torch.where(torch.arange(E, device=P.device)[None, :] < n_sel[:, None], order,
                          torch.full_like(order, -1))
        gsel = torch.where(sel >= 0, G.detach().gather(1, order), torch.zeros_like(Ps))
        record.append({
            "P": P.detach(), "z": z.detach(), "u": None if u is None else u.detach(),
            "mask": mask, "n_sel": n_sel, "selected": sel, "gates": gsel,
            "sorted_P": Ps, "excl": excl, "p": p_l,
            "LB": LB.detach(), "H": Hent.detach(),
        })
    return out, LB, Hent


def forward(model, idx, targets=None, record=None, p=None):
    """Forward pass. idx, targets: (B, T) long. Returns (logits (B,T,V), loss dict or None).

    p: per-layer thresholds (defaults to the model's controller state). record: a list that, when
    given, receives one dict per layer with the routing decisions and router statistics.
    """
    cfg = model.cfg
    prm = model.params
    B, T = idx.shape
    assert T <= cfg.max_seq_len
    dtype, device = prm["wte"].dtype, prm["wte"].device
    if p is None:
        p = model.p
    p = [float(x) for x in p]
    cos, sin = rope_tables(T, cfg.hd, dtype, device)

    # per-layer views (unbind keeps the backward cheap: one stack per tensor)
    lay = {n: prm[n].unbind(0) for n in ("g1", "wqkv", "wo", "g2", "wr", "theta")}
    w1 = [t.unbind(0) for t in prm["w1"].unbind(0)]
    w3 = [t.unbind(0) for t in prm["w3"].unbind(0)]
    w2 = [t.unbind(0) for t in prm["w2"].unbind(0)]

    x = prm["wte"][idx]                                   # (B, T, C)
    LBs, Hs = [], []
    for l in range(cfg.L):
        a = rmsnorm(x, lay["g1"][l])
        x = x + attention(a, lay["wqkv"][l], lay["wo"][l], cfg, cos, sin)
        m = rmsnorm(x, lay["g2"][l])
        params_l = {"wr": lay["wr"][l], "theta": lay["theta"][l], "w1": w1[l], "w3": w3[l], "w2": w2[l]}
        y, LB, Hent = moe_layer(m.reshape(B * T, cfg.C), params_l, cfg, p[l], record)
        x = x + y.view(B, T, cfg.C)
        LBs.append(LB)
        Hs.append(Hent)
    xf = rmsnorm(x, prm["gf"])
    logits = xf @ prm["wte"][:cfg.V].t()                 # tied head, first V rows only
    if targets is None:
        return logits, None
    ce = F.cross_entropy(logits.reshape(-1, cfg.V), targets.reshape(-1))
    LBv = torch.stack(LBs)
    Hv = torch.stack(Hs)
    total = ce + cfg.lb_coef * LBv.mean() + cfg.ent_coef * Hv.mean()
    return logits, {"total": total, "ce": ce, "LB": LBv, "H": Hv}


def routing_decisions(record, cfg):
    """Per-layer routing decisions from a forward `record`: numpy arrays
    n_selected (L, N), selected (L, N, E) padded with -1, gates (L, N, E), LB (L), H (L)."""
    n_sel = np.stack([r["n_sel"].cpu().numpy() for r in record]).astype(np.int32)
    sel = np.stack([r["selected"].cpu().numpy() for r in record]).astype(np.int32)
    gates = np.stack([r["gates"].double().cpu().numpy() for r in record])
    LB = np.array([float(r["LB"]) for r in record])
    H = np.array([float(r["H"]) for r in record])
    return {"n_selected": n_sel, "selected": sel, "gates": gates, "LB": LB, "H": H}


# ----------------------------------------------------------------------------------------------
# training: clipping, AdamW, learning-rate schedule, PI controller

def lr_at(step, peak, warmup, total):
    if step < warmup:
        return peak * (step + 1) / warmup
    lo = 0.1 * peak
    return lo + 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup))) * (peak - lo)


def make_optimizer(model, weight_decay=f32(0.1), lr=1e-3):
    decay = [model.params[n] for n in PARAM_NAMES if n in DECAYED]
    nodecay = [model.params[n] for n in PARAM_NAMES if n not in DECAYED]
    # torch's AdamW: w <- w*(1 - lr*wd), then w <- w - lr * m_hat / (sqrt(v_hat) + eps); this is
    # exactly w <- w - lr*(m_hat/(sqrt(v_hat)+eps) + wd*w) of the specification (checked by selfcheck.py)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": nodecay, "weight_decay": 0.0}],
                             lr=lr, betas=(BETA1, BETA2), eps=ADAM_EPS)


@torch.no_grad()
def clip_grads(model, max_norm=CLIP_NORM):
    """Global L2 norm clipping without epsilon. Returns the norm before clipping (float)."""
    sq = sum(float((t.grad.double() ** 2).sum()) for t in model.params.values() if t.grad is not None)
    norm = math.sqrt(sq)
    if norm > max_norm:
        scale = 1.0 / norm
        for t in model.params.values():
            if t.grad is not None:
                t.grad.mul_(scale)
    return norm


def controller_update(model, record):
    """PI controller of section 3 (global or per layer) with anti-windup. Updates model.p, model.I.

    Returns (a_t, list of per-layer p' before clamping, used only for boundary checks)."""
    cfg = model.cfg
    counts = torch.stack([r["n_sel"].double().cpu() for r in record])   # (L, N)
    a_t = float(counts.mean())
    pre = []
    if cfg.routing != "dtopp":
        return a_t, pre
    if cfg.controller == "global":
        errs = [(cfg.tgt - a_t) / cfg.E] * cfg.L
    else:
        errs = [(cfg.tgt - float(counts[l].mean())) / cfg.E for l in range(cfg.L)]
    for l in range(cfg.L):
        e = errs[l]
        I_new = float(model.I[l]) + e
        p_new = cfg.p0 + cfg.Kp * e + cfg.Ki * I_new
        pre.append(p_new)
        if cfg.pmin <= p_new <= cfg.pmax:
            model.p[l] = p_new
            model.I[l] = I_new
        else:
            model.p[l] = min(max(p_new, cfg.pmin), cfg.pmax)   # I unchanged while saturated
    return a_t, pre


def train_step(model, opt, idx, targets, lr, record=None):
    """One full training step. Returns a dict with the loss terms, a_t, grad norm, record."""
    if record is None:
        record = []
    model.zero_grad()
    _, losses = forward(model, idx, targets, record=record)
    losses["total"].backward()
    for t in model.params.values():     # unused parameters (theta without DRN) get a zero gradient
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    norm = clip_grads(model)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    a_t, p_pre = controller_update(model, record)
    return {"loss": losses["total"].item(), "ce": losses["ce"].item(), "a_t": a_t,
            "grad_norm": norm, "p_pre": p_pre, "record": record}


# ----------------------------------------------------------------------------------------------
# files

def _header_words():
    return np.zeros(HEADER_WORDS, dtype=np.int32)


def _set_f32(h, word, value):
    h[word] = np.frombuffer(np.float32(value).tobytes(), dtype=np.int32)[0]


def _get_f32(h, word):
    return float(np.frombuffer(np.int32(h[word]).tobytes(), dtype=np.float32)[0])


def save_model(model, path):
    cfg = model.cfg
    h = _header_words()
    h[0], h[1] = MODEL_MAGIC, MODEL_VERSION
    h[2:15] = [cfg.max_seq_len, cfg.V, cfg.Vp, cfg.L, cfg.NH, cfg.C, cfg.E, cfg.H,
               ROUTING[cfg.routing], CONTROLLER[cfg.controller], cfg.drn, cfg.renorm, cfg.k]
    for i, name in enumerate(Config.FLOAT_FIELDS):
        _set_f32(h, 32 + i, getattr(cfg, name))
    payload = np.concatenate([model.flat_params(), model.p.numpy(), model.I.numpy()]).astype(np.float32)
    assert payload.size == num_params(cfg) + 2 * cfg.L
    with open(path, "wb") as fh:
        fh.write(h.astype("<i4").tobytes())
        fh.write(payload.astype("<f4").tobytes())


def read_header(path, magic, version, what):
    """The raw bytes of a file and its 256-word header, after checking magic and version."""
    raw = open(path, "rb").read()
    if len(raw) < 4 * HEADER_WORDS:
        raise ValueError(f"{path}: too short for a header")
    h = np.frombuffer(raw[:4 * HEADER_WORDS], dtype="<i4").astype(np.int32)
    if h[0] != magic:
        raise ValueError(f"{path}: bad magic {h[0]} (expected {what} {magic})")
    if h[1] != version:
        raise ValueError(f"{path}: unsupported version {h[1]}")
    return raw, h


def read_model_header(path):
    raw, h = read_header(path, MODEL_MAGIC, MODEL_VERSION, "model checkpoint")
    ints = dict(max_seq_len=int(h[2]), V=int(h[3]), Vp=int(h[4]), L=int(h[5]), NH=int(h[6]),
                C=int(h[7]), E=int(h[8]), H=int(h[9]), routing=ROUTING_NAMES[int(h[10])],
                controller=CONTROLLER_NAMES[int(h[11])], drn=int(h[12]), renorm=int(h[13]), k=int(h[14]))
    floats = {name: _get_f32(h, 32 + i) for i, name in enumerate(Config.FLOAT_FIELDS)}
    return Config(**ints, **floats), h, raw


def load_model(path, dtype=torch.float64, device="cpu"):
    cfg, h, raw = read_model_header(path)
    n = num_params(cfg)
    expect = 4 * HEADER_WORDS + 4 * n + 8 * cfg.L
    if len(raw) != expect:
        raise ValueError(f"{path}: size {len(raw)} bytes, expected {expect}")
    data = np.frombuffer(raw[4 * HEADER_WORDS:], dtype="<f4").astype(np.float64)
    params = {}
    off = 0
    for name, shape in param_shapes(cfg).items():
        cnt = math.prod(shape)
        t = torch.from_numpy(data[off:off + cnt].copy()).reshape(shape)
        params[name] = t.to(dtype=dtype, device=device).requires_grad_(True)
        off += cnt
    p_state = data[off:off + cfg.L]
    i_state = data[off + cfg.L:off + 2 * cfg.L]
    return Model(cfg, params, p_state, i_state)


def ref_layout(B, T, V, L, E, n_params, n_steps):
    """(name, numpy dtype, count) of the reference fixture payload, in order."""
    N = B * T
    return [("inputs", np.int32, N), ("targets", np.int32, N), ("logits", np.float32, N * V),
            ("losses", np.float32, 2 + 2 * L), ("n_selected", np.int32, L * N),
            ("selected", np.int32, L * N * E), ("gates", np.float32, L * N * E),
            ("grads", np.float32, n_params), ("trajectory", np.float32, n_steps * (2 + L))]


def save_ref(path, cfg, B, T, n_steps, warmup, lr, weight_decay, arrays):
    h = _header_words()
    h[0], h[1] = REF_MAGIC, REF_VERSION
    h[2:10] = [B, T, cfg.V, cfg.L, cfg.E, num_params(cfg), n_steps, warmup]
    _set_f32(h, 32, lr)
    _set_f32(h, 33, weight_decay)
    with open(path, "wb") as fh:
        fh.write(h.astype("<i4").tobytes())
        for name, dt, cnt in ref_layout(B, T, cfg.V, cfg.L, cfg.E, num_params(cfg), n_steps):
            a = np.asarray(arrays[name]).ravel()
            assert a.size == cnt, (name, a.size, cnt)
            fh.write(a.astype("<i4" if dt == np.int32 else "<f4").tobytes())


def load_ref(path):
    raw, h = read_header(path, REF_MAGIC, REF_VERSION, "reference fixture")
    B, T, V, L, E, n_params, n_steps, warmup = (int(x) for x in h[2:10])
    layout = ref_layout(B, T, V, L, E, n_params, n_steps)
    expect = 4 * HEADER_WORDS + 4 * sum(c for _, _, c in layout)
    if len(raw) != expect:
        raise ValueError(f"{path}: size {len(raw)} bytes, expected {expect}")
    out = {"header": h, "B": B, "T": T, "V": V, "L": L, "E": E, "num_params": n_params,
           "n_steps": n_steps, "warmup": warmup, "lr": _get_f32(h, 32), "weight_decay": _get_f32(h, 33)}
    off = 4 * HEADER_WORDS
    for name, dt, cnt in layout:
        out[name] = np.frombuffer(raw[off:off + 4 * cnt], dtype="<i4" if dt == np.int32 else "<f4").copy()
        off += 4 * cnt
    return out
