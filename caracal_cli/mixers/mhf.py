"""Multi-Head Fourier (MHF) mixer — Caracal (Gan et al., ICML 2026, arXiv 2605.00292).

    x_norm = LayerNorm(CausalConv1d_pre(x))                 depthwise, k=3 ("local inductive bias")
    x_v    = Linear_v(x)                                    (or of x_norm: `value_from`)
    x_G    = CausalConv1d_G2(SiLU(Linear_G1(x_norm)))       grouped by head, k=`gate_kernel`
    y      = Linear_O(TRUNCATE_L(iFFT(FFT(PAD_2L(x_v)) ⊙ FFT(PAD_2L(x_G)))))

i.e. y_t = Σ_{j≤t} v_j ⊙ g_{t−j}: a causal convolution of two data-dependent sequences, O(L log L) by FFT.
Padding to 2L turns the FFT's circular convolution into a linear one, so no future token leaks in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from caracal_cli.config import ConfigError, ModelConfig, require_positive
from caracal_cli.mixers.precision import autocast_off
from caracal_cli.mixers import decode_sum, fftconv, gate_conv, pre_norm


def causal_fft_conv(v: torch.Tensor, g: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """y[:, t] = Σ_{j≤t} v[:, j] ⊙ g[:, t−j] for v, g of shape [B, L, D]; returns [B, L, D] in v's dtype.

    impl="auto" runs the Triton path of `fftconv.py` where `fftconv.fft_conv_path` allows it (CUDA, bf16/fp16);
    impl="torch", and every other case, the torch.fft reference below."""
    if fftconv.fft_conv_path(v.device, v.dtype, v.shape[1], impl) == "triton":
        return fftconv.causal_fft_conv_fast(v, g)
    return causal_fft_conv_reference(v, g)


@torch.compiler.disable  # Inductor generates no complex kernels, and tracing cuFFT calls only recompiles
def causal_fft_conv_reference(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The exact reference of `causal_fft_conv` on every device.

    Runs in float32 (float64 for float64 inputs) whatever the autocast state: bf16 FFTs lose too much over
    L terms. The transforms run along the last axis of [B, D, 2L] buffers, which cuFFT handles much faster than
    a strided axis; see `_FFTConv` for the layout work around them.
    """
    return _FFTConv.apply(v, g)


def _padded_positions_last(x: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """x [B, L, D] as a zero-padded [B, D, 2L] buffer in `work`: the transpose, the cast and the padding in one
    copy (rfft's own n=2L padding, applied to a transposed view, copied the whole signal once more)."""
    B, L, D = x.shape
    out = torch.empty(B, D, 2 * L, device=x.device, dtype=work)
    out[..., :L].copy_(x.transpose(1, 2))
    out[..., L:].zero_()
    return out


def _truncated_rows(y: torch.Tensor, L: int, dtype: torch.dtype) -> torch.Tensor:
    """The first L positions of an unnormalised inverse transform's [B, D, 2L] buffer, divided by its 2L points,
    as a contiguous [B, L, D] tensor in `dtype`, in one pass (a transposed view would make every elementwise
    kernel after it a strided, unvectorised one; irfft's own 1/n would be a pass over all 2L positions)."""
    B, D = y.shape[:2]
    out = torch.empty(B, L, D, device=y.device, dtype=dtype)
    torch.mul(y[..., :L], 1 / (2 * L), out=out.transpose(1, 2))
    return out


class _FFTConv(torch.autograd.Function):
    """y = TRUNCATE_L(iFFT(FFT(PAD_2L(v)) ⊙ FFT(PAD_2L(g)))) with an explicit backward: both gradients are
    correlations with the incoming gradient, TRUNCATE_L(iFFT(FFT(PAD_2L(dy)) ⊙ conj(the other spectrum))), from
    the two spectra the forward keeps (what autograd would keep), in three transforms and no layout copies
    beyond one per tensor in and out. (With a 2L transform the circular terms of both fall past L: exact.)"""

    @staticmethod
    def forward(ctx, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        L = v.shape[1]
        work = torch.float64 if v.dtype == torch.float64 else torch.float32
        with autocast_off(v.device):
            vf = torch.fft.rfft(_padded_positions_last(v, work))  # [B, D, L+1] complex
            gf = torch.fft.rfft(_padded_positions_last(g, work))
            y = torch.fft.irfft(vf * gf, n=2 * L, norm="forward")  # unnormalised: _truncated_rows divides
        ctx.save_for_backward(vf, gf)
        ctx.dtypes = (v.dtype, g.dtype)
        return _truncated_rows(y, L, v.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        vf, gf = ctx.saved_tensors
        L = dy.shape[1]

        def grad(other_f: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
            spectrum = dyf * other_f.conj()
            if batch == 1 < spectrum.shape[0]:  # an input shared across the batch (SWH's filter): sum first
                spectrum = spectrum.sum(0, keepdim=True)
            return _truncated_rows(torch.fft.irfft(spectrum, n=2 * L, norm="forward"), L, dtype)

        with autocast_off(dy.device):
            dyf = torch.fft.rfft(_padded_positions_last(dy, vf.real.dtype))
            dv = grad(gf, vf.shape[0], ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
            dg = grad(vf, gf.shape[0], ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return dv, dg


class CausalConv1d(nn.Module):
    """Conv1d over [B, L, C] that sees only the current and past k−1 positions (left padding)."""

    def __init__(self, channels: int, kernel: int, groups: int, bias: bool):
        super().__init__()
        self.kernel = kernel
        self.depthwise = groups == channels
        self.conv = nn.Conv1d(channels, channels, kernel, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """`state` holds the k−1 inputs before x ([B, k−1, C], cached decoding); it is updated in place."""
        k, L = self.kernel, x.shape[1]
        if self.depthwise and x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # the dtype autocast would run a Conv1d in
        if state is None:
            h = F.pad(x, (0, 0, k - 1, 0))  # [B, k−1+L, C]
        else:
            h = torch.cat([state.to(x.dtype), x], dim=1)
            state.copy_(h[:, h.shape[1] - (k - 1):])
        if self.depthwise:
            # k shifted products in the [B, L, C] layout: no transposes, and elementwise work that
            # torch.compile fuses with its neighbours (PyTorch's depthwise Conv1d kernel is a generic one)
            w = self.conv.weight[:, 0].to(x.dtype)  # [C, k]
            y = sum(h[:, j:j + L] * w[:, j] for j in range(k))
            return y if self.conv.bias is None else y + self.conv.bias.to(x.dtype)
        return self.conv(h.transpose(1, 2)).transpose(1, 2)


class MHF(nn.Module):
    """Multi-Head Fourier mixer: [B, L, D] → [B, L, D], causal."""

    @dataclass
    class Config:
        kind: str = "mhf"
        pre_conv: bool = True  # False: the "w/o PC" ablation (x_norm = LayerNorm(x))
        pre_kernel: int = 3
        gate: str = "two_stage"  # two_stage | linear (the SSLP ablation: x_G = Linear_G(x_norm))
        gate_kernel: int = 3  # Conv1d_G2's size (the unofficial reimplementation uses 1)
        value_from: str = "x"  # x (the slides) | x_norm (the reimplementation and the paper summary)
        # Divides the causal sum of t+1 terms at position t: mean (1/(t+1)) | sqrt (1/√(t+1)) | none. Not in the
        # paper. With sqrt, tiny stalled at the unigram loss (~6.43) for 50-100 steps on an H100 while the gate's
        # shared part grew as √t; mean did not stall and reached val 4.86 where sqrt reached 5.28 and 5.77
        # (200 steps of 131k tokens; llama-tiny 4.85).
        scale: str = "mean"
        # auto: the Triton kernels of fftconv.py on CUDA for bf16/fp16 (rel. error ~2e-3, 2-4x faster than
        # torch.fft on an H100 or H200), torch.fft elsewhere | torch: always the exact torch.fft path | fast:
        # the kernels or an error.
        fft_impl: str = "auto"
        # What surrounds the convolution: auto: on CUDA in bf16/fp16, eager or compiled, the pre-convolution with
        # the LayerNorm and SiLU with the gate convolution as Triton kernels (`pre_norm.py`, `gate_conv.py`),
        # elsewhere the PyTorch composition (on an H100 at d=768, L=2048, 65,536 tokens, fwd+bwd, one run: eager
        # 11.4 → 5.4 ms with the kernels; compiled 6.1 ms as Inductor fuses the composition, 4.8 with the
        # kernels) | torch: always the composition (the reference) | fast: the kernels or an error. Cached
        # decoding sums each block with `decode_sum.py`'s kernel on CUDA unless this is torch.
        module_impl: str = "auto"
        # Cached decoding sums the current block of this many positions exactly and folds finished blocks by FFT
        # (see `init_cache`): per token O(decode_block·d) plus one FFT over the history per block.
        decode_block: int = 256

        def validate(self, model: ModelConfig, where: str) -> None:
            require_positive(self, where, ("pre_kernel", "gate_kernel", "decode_block"))
            for key, allowed in (("gate", ("two_stage", "linear")), ("value_from", ("x", "x_norm")),
                                 ("scale", ("sqrt", "mean", "none")),
                                 ("fft_impl", ("auto", "torch", "fast")),
                                 ("module_impl", ("auto", "torch", "fast"))):
                if getattr(self, key) not in allowed:
                    raise ConfigError(f"{where}.{key} must be one of {', '.join(allowed)}; "
                                      f"got {getattr(self, key)!r}")

    def __init__(self, cfg: Config, model: ModelConfig):
        super().__init__()
        d = model.d_model
        self.cfg = cfg
        self.pre_conv = CausalConv1d(d, cfg.pre_kernel, groups=d, bias=False) if cfg.pre_conv else None
        self.norm = nn.LayerNorm(d, eps=model.norm_eps)
        self.value = nn.Linear(d, d, bias=False)
        self.gate_in = nn.Linear(d, d, bias=False)
        # Conv1d_G2 mixes the d_head channels of each head (groups = n_head); the linear gate has none.
        self.gate_conv = (CausalConv1d(d, cfg.gate_kernel, groups=model.n_head, bias=True)
                          if cfg.gate == "two_stage" else None)
        self.out = nn.Linear(d, d, bias=False)
        self.out.residual_projection = True  # scaled init (GPT-2)

    def path(self, device: torch.device) -> str:
        fused = {"pre_norm": "conv+LayerNorm", "gate": "SiLU+gate conv"}
        kernels = [fused[part] for part in self.fused_parts(device, torch.bfloat16, quiet=True)]
        module = f"triton {' and '.join(kernels)}" if kernels else "PyTorch composition"
        return f"{fftconv.path_label(device, self.cfg.fft_impl)}; around it: {module}"

    def fused_parts(self, device: torch.device, dtype: torch.dtype, quiet: bool = False) -> list[str]:
        """Which of "pre_norm" and "gate" run as Triton kernels for inputs computed in `dtype` on `device`. The
        one place that decides; module_impl=fast raises (unless `quiet`) where a part present cannot run."""
        if self.cfg.module_impl == "torch":
            return []
        why = None
        if device.type != "cuda":
            why = "not a CUDA device"
        elif not pre_norm.TRITON_AVAILABLE:
            why = "triton is not installed"
        elif dtype not in (torch.bfloat16, torch.float16):
            why = f"{dtype} inputs (the PyTorch composition runs them)"
        parts = []
        if self.pre_conv is not None and why is None:
            parts.append("pre_norm")
        if self.gate_conv is not None and why is None:
            d_head = self.gate_conv.conv.weight.shape[1]
            if gate_conv.gate_conv_path(device, dtype, d_head) == "triton":
                parts.append("gate")
            else:
                why = f"d_head={d_head} (the gate kernel needs a power of two in 16…128)"
        if self.cfg.module_impl == "fast" and why is not None and not quiet and device.type != "meta":
            raise RuntimeError(f"module_impl=fast cannot run here: {why}")
        return parts

    def forced_path_error(self, device: torch.device, dtype: torch.dtype, length: int) -> str | None:
        """Why a `fast` setting cannot run on `device` for `dtype` inputs of `length` tokens; None where it can
        (or nothing is forced). Asked before a run starts, so the refusal comes before anything is written."""
        try:
            fftconv.fft_conv_path(device, dtype, length, self.cfg.fft_impl)
            self.fused_parts(device, dtype)
        except RuntimeError as error:
            return str(error)
        return None

    def scale_factors(self, start: int, length: int, device: torch.device) -> torch.Tensor | None:
        """Per-position divisor of the causal sum at positions start..start+length−1, as [length, 1]."""
        if self.cfg.scale == "none":
            return None
        count = torch.arange(start + 1, start + length + 1, device=device, dtype=torch.float32)
        return (count.sqrt() if self.cfg.scale == "sqrt" else count).unsqueeze(1)

    def streams(self, x: torch.Tensor, cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The value and gate streams x_v, x_G, each [B, L, D]; each stage through its kernel where
        `fused_parts` says so (the first also writes x in the compute dtype, for the value stream)."""
        cuda = x.device.type == "cuda"  # (autocast queries fail on the meta device, where estimates run)
        dtype = torch.get_autocast_dtype("cuda") if cuda and torch.is_autocast_enabled("cuda") else x.dtype
        fused = [] if cache is not None else self.fused_parts(x.device, dtype)
        x_cast = None
        if "pre_norm" in fused:
            x_norm, x_cast = pre_norm.conv_layer_norm(x, self.pre_conv.conv.weight, self.norm.weight, self.norm.bias,
                                                      self.norm.eps, dtype, emit_cast=self.cfg.value_from == "x")
        else:
            h = x if self.pre_conv is None else self.pre_conv(x, None if cache is None else cache["pre"])
            x_norm = self.norm(h)
        v = self.value(x_norm if self.cfg.value_from == "x_norm" else x if x_cast is None else x_cast)
        g = self.gate_in(x_norm)
        if "gate" in fused:
            g = gate_conv.silu_gate_conv(g, self.gate_conv.conv.weight, self.gate_conv.conv.bias)
        elif self.gate_conv is not None:
            g = self.gate_conv(F.silu(g), None if cache is None else cache["gate"])
        return v, g

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        if cache is not None:
            return self._forward_cached(x, cache)
        v, g = self.streams(x)
        y = causal_fft_conv(v, g, self.cfg.fft_impl)
        scale = self.scale_factors(0, x.shape[1], x.device)
        if scale is not None:
            y = y / scale.to(y.dtype)
        return self.out(y)

    # --- cached decoding: every past v and g, summed in blocks --------------------------------------------
    # y_t = Σ_{j+k=t} v_j ⊙ g_k. With c = S·⌊t/S⌋ the start of t's block (S = decode_block), the pairs split into
    # those with j ≥ c (then k = t − j < S), those with k ≥ c (then j < S), and those with j, k < c; the first two
    # are disjoint once c ≥ S (for c = 0 they coincide: one is dropped). The last part, F_t, involves finished
    # blocks only: it is folded once per block, by one FFT over the first c positions, for the block's S outputs.
    # Per token: 4·S·d reads and products, plus the fold's O((c+S)·log(c+S)·d) once every S tokens, where summing
    # the whole history costs O(t·d) per token.
    def init_cache(self, batch: int, max_len: int, device=None, dtype=None) -> dict:
        """Preallocated streams for `max_len` positions (rounded up to whole blocks), the fold F of the current
        block ("folded", [B, S, d] in float32, float64 for float64 caches), the two convolutions' states; "pos"
        is a device tensor, so one captured `step` serves every position."""
        d, S = self.value.in_features, self.cfg.decode_block
        zeros = lambda n, dt=dtype: torch.zeros(batch, n, d, device=device, dtype=dt)  # noqa: E731
        work = torch.float64 if dtype == torch.float64 else torch.float32
        return {"pos": torch.zeros((), dtype=torch.long, device=device),
                "v": zeros(-(-max_len // S) * S), "g": zeros(-(-max_len // S) * S), "folded": zeros(S, work),
                "pre": zeros(self.cfg.pre_kernel - 1), "gate": zeros(self.cfg.gate_kernel - 1)}

    def _forward_cached(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """Any number of new positions, eagerly: one token is `step`; a chunk (a prefill) is the parallel path
        over the history, after which the fold is brought to the block the chunk ends in."""
        start, T = int(cache["pos"]), x.shape[1]
        if T == 1:
            self.prepare_step(cache, start)
            return self.step(x, cache)
        end, S = start + T, cache["folded"].shape[1]
        if end > cache["v"].shape[1]:
            raise ValueError(f"MHF cache holds {cache['v'].shape[1]} positions; asked for {end}")
        v, g = self.streams(x, cache)
        cache["v"][:, start:end] = v
        cache["g"][:, start:end] = g
        cache["pos"].fill_(end)
        y = causal_fft_conv(v, g, self.cfg.fft_impl) if start == 0 else \
            causal_fft_conv(cache["v"][:, :end], cache["g"][:, :end], self.cfg.fft_impl)[:, start:].to(v.dtype)
        if end % S:
            self._fold(cache, end - end % S)
        scale = self.scale_factors(start, T, x.device)
        return self.out(y if scale is None else y / scale.to(y.dtype))

    @property
    def decode_period(self) -> int:
        """Decoding's work repeats every decode_block tokens (one fold per block): timings span whole periods."""
        return self.cfg.decode_block

    def prepare_step(self, cache: dict, pos: int) -> None:
        """Host-side work before the step at position `pos`, outside any CUDA graph: a step that begins a block
        first folds the finished ones."""
        if pos % cache["folded"].shape[1] == 0:
            self._fold(cache, pos)

    def _fold(self, cache: dict, c: int) -> None:
        """F_{c+i} = Σ_{j, k < c, j+k = c+i} v_j ⊙ g_k for i < S, into cache["folded"]: the Triton convolution of
        the reversed streams where `fft_impl` runs it for c positions, else one float32 FFT of n ≥ c + S points
        (the circular wrap-around then lands below c)."""
        folded, S = cache["folded"], cache["folded"].shape[1]
        if c == 0:
            folded.zero_()
            return
        v, g = cache["v"][:, :c], cache["g"][:, :c]
        if fftconv.fft_conv_path(v.device, v.dtype, c, self.cfg.fft_impl) == "triton":
            # With both streams reversed (ṽ_m = v_{c−1−m}), F_{c+i} = Σ_m ṽ_m g̃_{c−2−i−m} is their causal convolution
            # y at c−2−i: c positions suffice (a 16K context stays within the on-chip kernels). The forward's
            # kernels on the 16-bit cache, at the forward's own precision, where the float32 cuFFT transform
            # below moves several times the bytes (at batch 64 and 16K positions it was half of a token's time).
            y = fftconv.causal_fft_conv_fast(v.flip(1), g.flip(1))
            rows = y[:, max(c - 1 - S, 0):c - 1].flip(1)  # F_{c+i} = y[c−2−i]; at c = S the last one is 0 (y[−1])
            folded[:, :rows.shape[1]].copy_(rows)
            folded[:, rows.shape[1]:].zero_()
            return
        n = 1 << (c + S - 1).bit_length()
        with autocast_off(folded.device):
            vf = torch.fft.rfft(v.transpose(1, 2).to(folded.dtype), n=n)  # [B, d, n/2+1]
            gf = torch.fft.rfft(g.transpose(1, 2).to(folded.dtype), n=n)
            folded.copy_(torch.fft.irfft(vf * gf, n=n)[..., c:c + S].transpose(1, 2))

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token x [B, 1, D] at position t = cache["pos"], after `prepare_step(cache, t)`: the current block's
        pairs summed exactly, plus the fold (`decode_sum.py`: a Triton kernel on CUDA unless module_impl=torch,
        else the PyTorch reference). Static shapes and no host sync, so a CUDA graph can hold it."""
        pos = cache["pos"]
        v, g = self.streams(x, cache)
        cache["v"].index_copy_(1, pos.view(1), v.to(cache["v"].dtype))
        cache["g"].index_copy_(1, pos.view(1), g.to(cache["g"].dtype))
        args = (cache["v"], cache["g"], cache["folded"], pos, self.cfg.scale)
        use_kernel = self.cfg.module_impl != "torch" and not torch.compiler.is_compiling()
        y = decode_sum.block_sum(*args) if use_kernel else decode_sum.block_sum_reference(*args)
        cache["pos"].add_(1)
        return self.out(y.to(v.dtype))

    def extra_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token beyond the weight matmuls: three FFTs of 2L points per channel
        (2.5·n·log₂n each) and the complex product, spread over the L tokens."""
        import math

        n = 2 * seq_len
        d = self.value.in_features
        return d * (3 * 2.5 * n * math.log2(n) + 6 * (n // 2 + 1)) / seq_len
