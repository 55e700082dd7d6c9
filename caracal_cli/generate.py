"""Text generation with per-layer static caches: the prompt is prefilled with each mixer's parallel path, then
every new token costs one cached step (a KV cache, a window ring, MHF's stored streams, an SSM state). On CUDA the
step is a CUDA graph (`Decoder`): decoding a small model is otherwise bound by kernel launches and Python, not by
the GPU (gpt-fast and vLLM do the same; mamba_ssm's `generate` captures its step too)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from caracal_cli.device import AUTOCAST_DTYPES
from caracal_cli.model import reset_caches

DECODE_IMPLS = ("eager", "graph", "compiled")  # compiled: the Inductor-compiled step, in a CUDA graph on CUDA


def bucket_length(positions: int) -> int:
    """The cache length for `positions` positions: the next power of two (at least 64), so prompts of similar
    lengths share one set of caches and one captured graph."""
    return max(64, 1 << (positions - 1).bit_length())


@dataclass
class _Slot:
    """Caches for one (batch, length), and the graph captured over them with its static input and output."""
    length: int
    caches: list[dict]
    tokens: torch.Tensor | None = None  # [B, 1] long
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [B, vocab]


class Decoder:
    """Decoding over static caches: `start` prefills a batch of same-length prompts (whole, or in chunks of
    `prefill_chunk` tokens) and returns the last position's logits; each `step` feeds one token per sequence
    and returns the next logits [B, vocab]. With `graphs` (default: on CUDA) a step replays a CUDA graph of
    `model.decode_step`, captured once per (batch, cache length) and reused across tokens and prompts; without,
    the same step runs eagerly (the reference, and the CPU path). A graph step's logits are a static buffer
    that the next step overwrites. `autocast`: the dtype the model runs under (16-bit caches with it); the
    `keep` most recently used (batch, length) caches are kept, with their graphs. `compile_step`: the step is
    compiled by Inductor first (its norms, residuals and elementwise work fused into fewer kernels; a graph then
    holds the compiled kernels), at the cost of a compilation per (batch, cache length)."""

    def __init__(self, model, graphs: bool | None = None, autocast: torch.dtype | None = None,
                 prefill_chunk: int | None = None, keep: int = 2, compile_step: bool = False):
        self.model = model
        self._compiled_step = torch.compile(model.decode_step, dynamic=False) if compile_step else None
        self.device = next(model.parameters()).device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {self.device.type}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.autocast = None if autocast == torch.float32 else autocast
        self.prefill_chunk, self.keep = prefill_chunk, keep
        self._cast = _CastLinears(model, self.autocast) if self.graphs and self.autocast else None
        self._slots: dict[tuple[int, int], _Slot] = {}
        self.slot: _Slot | None = None
        self.pos = 0  # the host's copy of the position the next step writes

    def _decode_step(self):
        """The step a token runs: the compiled one, or the model's own (looked up each time: tests wrap it)."""
        return self._compiled_step or self.model.decode_step

    def _autocast(self, capturing: bool = False):
        if self.autocast is None:
            return contextlib.nullcontext()
        # a graph must not capture autocast's cached weight casts: they are freed when the context exits
        return torch.autocast(self.device.type, dtype=self.autocast, cache_enabled=not capturing)

    @torch.inference_mode()
    def start(self, ids: torch.Tensor, max_new_tokens: int, length: int | None = None) -> torch.Tensor:
        """Prefill ids [B, T] into caches for `length` positions (default: `bucket_length(T + max_new_tokens)`);
        returns the logits [B, vocab] that the first new token is chosen from."""
        batch, T = ids.shape
        length = length or bucket_length(T + max_new_tokens)
        if T + max_new_tokens > length:
            raise ValueError(f"{T} prompt + {max_new_tokens} new tokens do not fit caches of {length} positions")
        if self._cast is not None:
            self._cast.refresh()  # the weights may have changed since the last prompt (samples during training)
        self.slot = self._slot(batch, length)
        reset_caches(self.slot.caches)
        chunk = self.prefill_chunk or T
        with self._autocast():
            for begin in range(0, T, chunk):
                logits = self.model(ids[:, begin:begin + chunk], self.slot.caches, last_only=True)[:, -1]
        self.pos = T
        return logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B] (one per sequence) at the current position; returns the next logits [B, vocab]."""
        slot = self.slot
        if slot is None:
            raise RuntimeError("Decoder.step before Decoder.start")
        if self.pos >= slot.length:  # the step itself cannot check: it writes where the device says
            raise ValueError(f"the caches hold {slot.length} positions; start a longer bucket")
        self.model.prepare_step(slot.caches, self.pos)
        if slot.graph is not None:
            slot.tokens.copy_(tokens.view(-1, 1))
            slot.graph.replay()
            logits = slot.logits
        else:
            with self._autocast():
                logits = self._decode_step()(tokens.view(-1, 1), slot.caches)
        self.pos += 1
        return logits

    def _slot(self, batch: int, length: int) -> _Slot:
        key = (batch, length)
        slot = self._slots.pop(key, None)
        if slot is None:
            while len(self._slots) >= self.keep:  # the oldest caches and graph make room
                self._slots.pop(next(iter(self._slots)))
            dtype = self.autocast or self.model.embed.weight.dtype
            slot = _Slot(length, self.model.init_caches(batch, length, self.device, dtype))
            if self.graphs:
                self._capture(slot, batch)
        self._slots[key] = slot  # the most recently used last
        return slot

    def _capture(self, slot: _Slot, batch: int) -> None:
        """Capture `model.decode_step` over the slot's caches, after warm-up steps on a side stream (lazy
        initialisations and library workspaces must not happen during capture), as torch.cuda.graphs asks."""
        slot.tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        swapped = self._cast.swapped if self._cast is not None else contextlib.nullcontext
        # the capture's own autocast state: torch.compile guards on it, and a recompile must not happen in capture
        with torch.cuda.stream(stream), self._autocast(capturing=True), swapped():
            for pos in range(2):
                self.model.prepare_step(slot.caches, pos)
                self._decode_step()(slot.tokens, slot.caches)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        reset_caches(slot.caches)
        slot.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(slot.graph), self._autocast(capturing=True), swapped():
            slot.logits = self._decode_step()(slot.tokens, slot.caches)
        reset_caches(slot.caches)


class _CastLinears:
    """16-bit copies of the model's Linear weights for captured steps. Autocast casts a Linear's fp32 weight
    on every call, and inside a graph it cannot cache the cast: each step would read the fp32 weights and write
    and read a 16-bit copy again (more bytes than the step's own work on a small model, and one more kernel per
    Linear). The graph instead captures these copies, which give the same products, since autocast rounds the
    weight to the same dtype. The model keeps its own weights; `refresh` updates the copies in place (the
    graphs hold their addresses). Weights tied to an embedding stay as they are (its output is not cast)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        self.weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)
                        and m.weight.dtype != dtype and m.weight.is_floating_point() and id(m.weight) not in embedded]
        self.copies = [w.detach().to(dtype) for w in self.weights]

    @torch.no_grad()
    def refresh(self) -> None:
        for weight, copy in zip(self.weights, self.copies, strict=True):
            copy.copy_(weight)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        originals = [w.data for w in self.weights]
        try:
            for weight, copy in zip(self.weights, self.copies, strict=True):
                weight.data = copy
            yield
        finally:
            for weight, original in zip(self.weights, originals, strict=True):
                weight.data = original


def decode_settings(impl: str, dtype: str, device: torch.device) -> tuple[str, torch.dtype]:
    """`caracal generate`'s --decode-impl and --dtype for `device`, resolved: impl auto is a CUDA graph on CUDA
    and the eager step elsewhere; dtype auto is bf16 autocast on a CUDA device that has it (what training runs
    under), fp32 elsewhere. Raises ValueError naming the option for a value that cannot run here."""
    cuda = device.type == "cuda"
    if impl == "auto":
        impl = "graph" if cuda else "eager"
    if impl not in DECODE_IMPLS:
        raise ValueError(f"unknown --decode-impl {impl!r} (known: auto, {', '.join(DECODE_IMPLS)})")
    if impl == "graph" and not cuda:
        raise ValueError(f"--decode-impl graph replays CUDA graphs; the device is {device.type} (eager or "
                         "compiled run there)")
    if dtype == "auto":
        dtype = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r} (known: auto, {', '.join(AUTOCAST_DTYPES)})")
    return impl, AUTOCAST_DTYPES[dtype]


def decoder_for(model, impl: str, autocast: torch.dtype | None, **options) -> Decoder:
    """A Decoder that runs the decoding path `impl` (one of DECODE_IMPLS; compiled is also captured in a graph
    on CUDA); `options` go to Decoder as they are."""
    cuda = next(model.parameters()).device.type == "cuda"
    return Decoder(model, graphs=impl == "graph" or (impl == "compiled" and cuda), autocast=autocast,
                   compile_step=impl == "compiled", **options)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Mask [B, V] logits outside the top-k and outside the smallest set whose probability reaches top-p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits of the last position → [B] token ids; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(model, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
                 top_k: int | None = 50, top_p: float | None = None, seed: int | None = None,
                 stop: Callable[[list[int]], bool] | None = None, decoder: Decoder | None = None) -> Iterator[int]:
    """Yield new token ids one at a time, through `decoder` (default: a `Decoder` of the model, CUDA graphs on
    CUDA). The prompt is cut from the left to the model's context when the model has learned positions (the
    only kind with a hard limit)."""
    if not prompt:
        raise ValueError("the prompt is empty")
    cfg = model.config
    if cfg.pos_emb == "learned":
        prompt = prompt[-cfg.context:]
        max_new_tokens = min(max_new_tokens, cfg.context - len(prompt))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    decoder = decoder or Decoder(model)
    logits = decoder.start(torch.tensor([prompt], device=device), max_new_tokens)
    produced: list[int] = []
    for i in range(max_new_tokens):
        token = next_token(logits, temperature, top_k, top_p, generator)
        produced.append(int(token))
        yield int(token)
        if (stop is not None and stop(produced)) or i == max_new_tokens - 1:
            return
        logits = decoder.step(token)


def stream_text(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Turn a stream of ids into a stream of text pieces, holding back an incomplete UTF-8 character."""
    produced: list[int] = []
    shown = ""
    for token in ids:
        produced.append(token)
        text = tokenizer.decode(produced)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            continue
        yield text[len(shown):]
        shown = text
    text = tokenizer.decode(produced)
    if len(text) > len(shown):
        yield text[len(shown):]
