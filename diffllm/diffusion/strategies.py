"""Unmasking strategies: which [MASK] positions to commit, and to what token.

Every strategy sees the (N, V) logits of one row's N still-masked positions of the current block
and returns ``(confidence, tokens)``, both (N,): the token proposed for each position and a
float64 score; the sampler commits the highest-scoring positions. Tokens are drawn from

    p = softmax(filter_top_p(filter_top_k(logits / T)))           (T = temperature)

with ``x = argmax p`` when T = 0 (greedy) and ``x ~ Categorical(p)`` otherwise. The scores:

    random          c_i ~ U(0, 1)                    Dream ``origin``: unmask uniformly at random
    low_confidence  c_i = p_i(x_i)                   LLaDA low-confidence remasking / MaskGIT
    margin          c_i = p_i(top1) - p_i(top2)      Dream ``topk_margin``
    entropy         c_i = sum_v p_iv log p_iv        Dream ``entropy`` (negative entropy)

``STRATEGIES`` maps the config name to the function, so the sampler never branches on strings.
All randomness comes from the row's own ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenSampling:
    """How a token is drawn from the logits: temperature (0 = greedy), top-k and top-p filters."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """(N, V) logits with everything outside the top-k / the top-p nucleus set to -inf.

    top-p keeps the smallest set of most likely tokens whose probability mass reaches ``top_p``
    (the most likely token is always kept). ``None`` (or top_k 0, top_p 1) disables a filter.
    """
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (N, V)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor, sampling: TokenSampling, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits -> tokens (N,) and the float32 probabilities p (N, V) they were drawn from."""
    logits = logits.float()
    if sampling.temperature > 0:
        logits = logits / sampling.temperature
    logits = filter_logits(logits, sampling.top_k, sampling.top_p)
    probs = logits.softmax(dim=-1)  # (N, V)
    if sampling.temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        tokens = probs.argmax(dim=-1)
    return tokens, probs


# (logits (N, V), sampling, the row's generator) -> (confidence (N,) float64, tokens (N,))
Strategy = Callable[[torch.Tensor, TokenSampling, torch.Generator | None], tuple[torch.Tensor, torch.Tensor]]


def random_order(
    logits: torch.Tensor, sampling: TokenSampling, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_i ~ U(0, 1): the positions to unmask are chosen uniformly at random (Dream ``origin``)."""
    tokens, _ = sample_tokens(logits, sampling, generator)
    confidence = torch.rand(tokens.shape, generator=generator, device=tokens.device, dtype=torch.float64)
    return confidence, tokens


def low_confidence(
    logits: torch.Tensor, sampling: TokenSampling, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_i = p_i(x_i), the probability of the proposed token (LLaDA low-confidence remasking)."""
    tokens, probs = sample_tokens(logits, sampling, generator)
    return probs.gather(-1, tokens[:, None]).squeeze(-1).double(), tokens


def margin(
    logits: torch.Tensor, sampling: TokenSampling, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_i = p_i(top1) - p_i(top2), the gap between the two most likely tokens."""
    tokens, probs = sample_tokens(logits, sampling, generator)
    top2 = torch.topk(probs.double(), 2, dim=-1).values  # (N, 2)
    return top2[:, 0] - top2[:, 1], tokens


def entropy(
    logits: torch.Tensor, sampling: TokenSampling, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_i = sum_v p_iv log p_iv, the negative entropy of position i (0 log 0 = 0)."""
    tokens, probs = sample_tokens(logits, sampling, generator)
    p = probs.double()
    return torch.xlogy(p, p).sum(dim=-1), tokens


STRATEGIES: dict[str, Strategy] = {
    "random": random_order,
    "low_confidence": low_confidence,
    "margin": margin,
    "entropy": entropy,
}


def choose_positions(confidence: torch.Tensor, num: int | None, threshold: float | None) -> torch.Tensor:
    """Indices (into ``confidence`` (N,)) of the positions to commit this step.

    With ``threshold`` τ: every i with c_i > τ, or the single most confident one if none is
    (Fast-dLLM parallel decoding). Otherwise the ``num`` most confident. Ties go to the lower
    index, so the choice is deterministic. Returned in ascending position order.
    """
    order = torch.sort(confidence, descending=True, stable=True).indices  # (N,)
    if threshold is not None:
        above = int((confidence > threshold).sum())
        chosen = order[: max(above, 1)]
    else:
        if num is None:
            raise ValueError("choose_positions needs either num or threshold")
        chosen = order[: max(0, min(num, confidence.numel()))]
    return chosen.sort().values
