"""Text generation with per-layer caches: the prompt is prefilled with each mixer's parallel path, then every
new token costs one cached step (a KV cache, a window ring, MHF's stored streams, an SSM state)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


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
                 stop: Callable[[list[int]], bool] | None = None) -> Iterator[int]:
    """Yield new token ids one at a time. The prompt is cut from the left to the model's context when the
    model has learned positions (the only kind with a hard limit)."""
    if not prompt:
        raise ValueError("the prompt is empty")
    cfg = model.config
    if cfg.pos_emb == "learned":
        prompt = prompt[-cfg.context:]
        max_new_tokens = min(max_new_tokens, cfg.context - len(prompt))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    caches = model.init_caches(1, len(prompt) + max_new_tokens)
    logits = model(torch.tensor([prompt], device=device), caches, last_only=True)[:, -1]
    produced: list[int] = []
    for _ in range(max_new_tokens):
        token = next_token(logits, temperature, top_k, top_p, generator)
        produced.append(int(token))
        yield int(token)
        if stop is not None and stop(produced):
            return
        logits = model(token.view(1, 1), caches)[:, -1]


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
