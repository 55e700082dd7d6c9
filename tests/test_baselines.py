"""The baselines (Mamba, Mamba-2, Jamba, SWH): the reference scans against step-by-step recurrences written
here from the papers' equations (forward and gradients, float64), chunked SWA against naive masked attention,
mamba_ssm's parameter layout and initialisation, path selection, parameter counts, and a few training steps."""

import math

import pytest
import torch
import torch.nn.functional as F

from caracal_cli.config import ConfigError, load_preset
from caracal_cli.mixers import build_mixer
from caracal_cli.mixers.mamba import SelectiveScan, mamba_backend, run_library, selective_scan
from caracal_cli.mixers.swh import chunked_window_attention
from caracal_cli.model import build_model, count_parameters
from conftest import small_model_config

FAMILIES = ["mamba", "mamba2", "jamba", "swh"]


def make(raw, **model_overrides):
    return build_mixer(raw, small_model_config(**model_overrides)).double()


# --- oracles: one time step at a time ---------------------------------------------------------------------
def conv_by_taps(u, conv):
    """Causal depthwise conv, tap by tap: y_t = bias + Σ_k w_k · u_{t−(K−1−k)}. u: [B, L, C]."""
    K, L = conv.weight.shape[-1], u.shape[1]
    y = sum(conv.weight[:, 0, k] * F.pad(u, (0, 0, K - 1 - k, 0))[:, :L] for k in range(K))
    return y if conv.bias is None else y + conv.bias


def mamba_recurrence(m, x):
    """Mamba (Gu & Dao 2023, Alg. 2) with h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t x_t, one step at a time."""
    E, N, R = m.D.shape[0], m.A_log.shape[1], m.dt_proj.in_features
    u, z = F.linear(x, m.in_proj.weight, m.in_proj.bias).split([E, E], -1)
    u = F.silu(conv_by_taps(u, m.conv1d))
    dbc = u @ m.x_proj.weight.T
    dt = F.softplus(dbc[..., :R] @ m.dt_proj.weight.T + m.dt_proj.bias)
    Bm, Cm = dbc[..., R:R + N], dbc[..., R + N:]
    A = -torch.exp(m.A_log)
    h = x.new_zeros(x.shape[0], E, N)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * Bm[:, t, None, :] * u[:, t, :, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + m.D * u[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


def mamba2_recurrence(m, x):
    """Mamba-2 (Dao & Gu 2024): per head a scalar decay, S_t = exp(Δ_t A) S_{t−1} + Δ_t x_t B_tᵀ, y = S C."""
    c, H = m.cfg, m.nheads
    P, N, G = c.headdim, c.d_state, c.ngroups
    E, Bsz, L = H * P, x.shape[0], x.shape[1]
    zxbcdt = F.linear(x, m.in_proj.weight, m.in_proj.bias)
    z, xBC, dt = zxbcdt[..., :E], zxbcdt[..., E:2 * E + 2 * G * N], zxbcdt[..., 2 * E + 2 * G * N:]
    xBC = F.silu(conv_by_taps(xBC, m.conv1d))
    xs = xBC[..., :E].reshape(Bsz, L, H, P)
    Bh = xBC[..., E:E + G * N].reshape(Bsz, L, G, N).repeat_interleave(H // G, dim=2)  # [B, L, H, N]
    Ch = xBC[..., E + G * N:].reshape(Bsz, L, G, N).repeat_interleave(H // G, dim=2)
    dt = F.softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    S = x.new_zeros(Bsz, H, P, N)
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        S = decay * S + dt[:, t, :, None, None] * xs[:, t, :, :, None] * Bh[:, t, :, None, :]
        ys.append((S * Ch[:, t, :, None, :]).sum(-1) + m.D[:, None] * xs[:, t])
    y = (torch.stack(ys, 1).reshape(Bsz, L, E) * F.silu(z)).reshape(Bsz, L, G, E // G)
    y = (y / torch.sqrt(y.square().mean(-1, keepdim=True) + m.norm.eps)).reshape(Bsz, L, E) * m.norm.weight
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


def assert_same_forward_and_gradients(mixer, oracle, x):
    x = x.clone().requires_grad_()
    weights = torch.randn(x.shape, dtype=x.dtype)
    names, params = zip(*mixer.named_parameters(), strict=True)
    got, want = mixer(x), oracle(mixer, x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    grads = torch.autograd.grad((got * weights).sum(), [x, *params])
    expected = torch.autograd.grad((want * weights).sum(), [x, *params])
    for name, g, e in zip(("input", *names), grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10, msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.parametrize("raw, length, chunk", [
    ({"kind": "mamba"}, 37, 64),
    ({"kind": "mamba"}, 37, 8),  # the scan's state checkpoints: 4 whole chunks and a partial one
    ({"kind": "mamba"}, 1, 64),
    ({"kind": "mamba", "d_state": 3, "d_conv": 2, "expand": 1, "dt_rank": 5, "bias": True}, 16, 4),
])
def test_mamba_reference_equals_the_recurrence(raw, length, chunk, monkeypatch):
    monkeypatch.setattr(SelectiveScan, "chunk", chunk)
    assert_same_forward_and_gradients(make(raw, d_model=16), mamba_recurrence,
                                      torch.randn(2, length, 16, dtype=torch.float64))


@pytest.mark.parametrize("raw, length", [
    ({"kind": "mamba2", "d_state": 8, "headdim": 8, "reference_chunk": 4}, 19),  # 5 chunks, the last one padded
    ({"kind": "mamba2", "d_state": 8, "headdim": 8, "reference_chunk": 64}, 19),  # one chunk
    ({"kind": "mamba2", "d_state": 4, "headdim": 4, "ngroups": 2, "d_conv": 3, "reference_chunk": 3, "bias": True}, 8),
])
def test_mamba2_reference_equals_the_recurrence(raw, length):
    assert_same_forward_and_gradients(make(raw, d_model=16), mamba2_recurrence,
                                      torch.randn(2, length, 16, dtype=torch.float64))


@pytest.mark.parametrize("length", [1, 5, 10])
def test_selective_scan_backward_passes_gradcheck(length, monkeypatch):
    """The hand-written backward, initial and final states included, against finite differences."""
    monkeypatch.setattr(SelectiveScan, "chunk", 4)  # one chunk; 4+1; 4+4+2
    B, E, N = 2, 3, 2
    args = (torch.randn(B, length, E), torch.rand(B, length, E) * 0.5, -torch.rand(E, N) * 2,
            torch.randn(B, length, N), torch.randn(B, length, N), torch.randn(B, E, N))
    args = tuple(t.double().requires_grad_() for t in args)
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a), args)


# --- SWH ----------------------------------------------------------------------------------------------------
def naive_block_causal_attention(q, k, v, chunk):
    """Softmax over the full score matrix, −∞ unless j ≤ i and j's chunk is i's or the previous one."""
    L = q.shape[2]
    i, j = torch.arange(L).unsqueeze(1), torch.arange(L).unsqueeze(0)
    allowed = (j <= i) & (i // chunk - j // chunk <= 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("length, chunk", [(1, 4), (13, 4), (32, 32), (70, 8), (9, 1)])
def test_chunked_swa_equals_naive_block_causal_attention(length, chunk):
    q, k, v = (torch.randn(2, 3, length, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(chunked_window_attention(q, k, v, chunk), naive_block_causal_attention(q, k, v, chunk),
                               rtol=1e-10, atol=1e-10)


def test_swh_mixer_equals_direct_formula():
    """out_proj(RMSNorm(Σ_j k_{t−j} u_j) + SWA(RoPE q, RoPE k, v)) with the oscillator kernel written out."""
    from caracal_cli.mixers.attention import apply_rope, rope_tables

    m = make({"kind": "swh", "width": 24, "heads": 3, "chunk": 5})
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    B, L, _ = x.shape
    u = m.proj(x)
    s = torch.zeros_like(u)
    for t in range(L):
        for j in range(t + 1):
            s[:, t] += u[:, j] * torch.exp(-m.decay.abs() * (t - j)) * torch.cos(m.freq * (t - j))
    q, k, v = m.qkv(x).view(B, L, 3, 3, 8).permute(2, 0, 3, 1, 4)
    cos, sin = rope_tables(L, 8, 10000.0)
    a = naive_block_causal_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, 5)
    expected = m.out_proj(m.norm(s) + a.transpose(1, 2).reshape(B, L, 24))
    torch.testing.assert_close(m(x), expected, rtol=1e-9, atol=1e-10)


# --- mamba_ssm's layout, initialisation, and the choice of path ---------------------------------------------
def test_parameter_names_and_shapes_are_mamba_ssms():
    d, E, N, R = 32, 64, 16, 2
    mamba = build_mixer({"kind": "mamba"}, small_model_config())
    assert {k: tuple(v.shape) for k, v in mamba.state_dict().items()} == {
        "in_proj.weight": (2 * E, d), "conv1d.weight": (E, 1, 4), "conv1d.bias": (E,),
        "x_proj.weight": (R + 2 * N, E), "dt_proj.weight": (E, R), "dt_proj.bias": (E,),
        "A_log": (E, N), "D": (E,), "out_proj.weight": (d, E)}
    H, N2 = E // 16, 8
    mamba2 = build_mixer({"kind": "mamba2", "d_state": N2, "headdim": 16}, small_model_config())
    assert {k: tuple(v.shape) for k, v in mamba2.state_dict().items()} == {
        "in_proj.weight": (2 * E + 2 * N2 + H, d), "conv1d.weight": (E + 2 * N2, 1, 4), "conv1d.bias": (E + 2 * N2,),
        "dt_bias": (H,), "A_log": (H,), "D": (H,), "norm.weight": (E,), "out_proj.weight": (d, E)}


def test_ssm_initialisation_survives_the_model_init():
    model = build_model(load_preset("jamba-demo").model)
    mixer = model.blocks[0].mixer
    N = mixer.A_log.shape[1]
    torch.testing.assert_close(mixer.A_log.exp(), torch.arange(1.0, N + 1).expand_as(mixer.A_log))
    dt = F.softplus(mixer.dt_proj.bias)
    assert (dt >= 1e-3 * 0.999).all() and (dt <= 0.1 * 1.001).all() and dt.std() > 0
    assert mixer.dt_proj.weight.abs().max() <= mixer.dt_proj.in_features ** -0.5
    assert (mixer.D == 1).all()
    mixer2 = build_model(load_preset("mamba2-demo").model).blocks[0].mixer
    assert (mixer2.A_log.exp() >= 1).all() and (mixer2.A_log.exp() <= 16).all()
    dt2 = F.softplus(mixer2.dt_bias)
    assert (dt2 >= 1e-3 * 0.999).all() and (dt2 <= 0.1 * 1.001).all()


@pytest.mark.skipif(mamba_backend().available, reason="mamba_ssm imports here")
def test_impl_library_without_mamba_ssm_is_a_clear_error():
    for name in ("mamba-demo", "mamba2-demo"):
        with pytest.raises(ConfigError, match="impl is library, but mamba_ssm unavailable"):
            load_preset(name, ["model.mixers.M.impl=library"])
    mixer = build_mixer({"kind": "mamba"}, small_model_config())
    assert mixer.path(torch.device("cpu")).startswith("reference PyTorch chunked scan (mamba_ssm unavailable")
    assert mixer.path(torch.device("cuda")).startswith("reference")


def test_impl_is_validated():
    with pytest.raises(ConfigError, match="impl must be one of auto, library, reference"):
        load_preset("mamba-demo", ["model.mixers.M.impl=fast"])
    with pytest.raises(ConfigError, match="headdim=48 does not divide"):
        load_preset("mamba2-demo", ["model.mixers.M.headdim=48"])


def test_library_delegation_runs_on_the_mixers_own_parameters():
    """run_library rebinds a second module's parameters to the mixer's: same output, gradients land on the
    mixer, and its state_dict has no extra keys. (A reference Mamba stands in for mamba_ssm's module here.)"""
    mixer = make({"kind": "mamba"})
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    build = lambda: build_mixer({"kind": "mamba", "impl": "reference"}, small_model_config()).to("meta")  # noqa: E731
    keys = set(mixer.state_dict())
    y = run_library(mixer, build, x)
    torch.testing.assert_close(y, mixer(x))
    y.sum().backward()
    assert all(p.grad is not None for p in mixer.parameters())
    assert set(mixer.state_dict()) == keys



def state_update_reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """selective_state_update's contract in plain PyTorch (3-D Mamba or 4-D Mamba-2 shapes, groups of heads
    sharing B and C), standing in for mamba_ssm's Triton kernel on a CPU."""
    heads = state.dim() == 4
    if not heads:
        state, x, dt, A, B, C, D, z, dt_bias = (t if t is None else t.unsqueeze(i) for t, i in zip(
            (state, x, dt, A, B, C, D, z, dt_bias), (1, 1, 1, 0, 1, 1, 0, 1, 0), strict=True))
    dt = dt + dt_bias if dt_bias is not None else dt
    dt = F.softplus(dt) if dt_softplus else dt
    repeat = state.shape[1] // B.shape[1]
    Bh, Ch = B.repeat_interleave(repeat, 1)[:, :, None], C.repeat_interleave(repeat, 1)[:, :, None]
    state.copy_(torch.exp(dt[..., None] * A) * state + (dt * x)[..., None] * Bh)
    out = (state * Ch).sum(-1) + (D * x if D is not None else 0)
    out = out * F.silu(z) if z is not None else out
    return out if heads else out[:, 0]


@pytest.mark.parametrize("raw", [{"kind": "mamba"},
                                 {"kind": "mamba2", "d_state": 8, "headdim": 8},
                                 {"kind": "mamba2", "d_state": 4, "headdim": 4, "ngroups": 2}])
def test_library_step_through_the_op_equals_the_reference_step(raw, monkeypatch):
    """The library's one-token step goes through one custom op (torch.compile does not trace mamba_ssm's
    Python): with a reference kernel behind it, its arguments, Mamba-2's per-head broadcasts and the in-place
    state update give the reference step's outputs and states, eager and compiled as one graph."""
    from caracal_cli.mixers import mamba

    backend = mamba.MambaBackend(None, None, False, "stand-in", state_update_reference)
    monkeypatch.setattr(mamba, "mamba_backend", lambda: backend)
    mixer = make(raw, d_model=16).double()
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    reference, library = mixer.init_cache(3, 8, dtype=torch.float64), mixer.init_cache(3, 8, dtype=torch.float64)
    compiled_cache = mixer.init_cache(3, 8, dtype=torch.float64)
    compiled = torch.compile(mixer._library_step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for t in range(x.shape[1]):
            want = mixer.step(x[:, t:t + 1], reference)
            torch.testing.assert_close(mixer._library_step(x[:, t:t + 1], library), want)
            torch.testing.assert_close(compiled(x[:, t:t + 1], compiled_cache), want)
    for name in reference:
        torch.testing.assert_close(library[name], reference[name])
        torch.testing.assert_close(compiled_cache[name], reference[name])

# --- whole models --------------------------------------------------------------------------------------------
LLAMA = {"tiny": "llama-tiny", "small": "llama-small", "medium": "llama-medium", "large": "llama-large"}


@pytest.mark.parametrize("size", list(LLAMA))
def test_swh_is_within_5_percent_of_llama(size):
    with torch.device("meta"):
        swh = count_parameters(build_model(load_preset(f"swh-{size}").model))["total"]
        llama = count_parameters(build_model(load_preset(LLAMA[size]).model))["total"]
    assert abs(swh - llama) / llama < 0.05, (swh, llama)


@pytest.mark.parametrize("family", FAMILIES)
def test_demo_preset_trains_on_cpu(family):
    config = load_preset(f"{family}-demo")
    assert config.model.family == family
    model = build_model(config.model)
    opt = torch.optim.AdamW(model.parameters(), lr=config.train.lr, betas=config.train.betas)
    ids = torch.randint(0, config.model.vocab_size, (2, 65))
    losses = []
    for _ in range(4):  # three optimizer steps, and the loss after them
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        losses.append(loss.item())
        if len(losses) == 4:
            break
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        opt.step()
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0] - 0.05, losses
