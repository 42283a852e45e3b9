"""Unmasking strategies: which [MASK] positions to commit, and to what token.

Every strategy sees the (B, N, V) logits of the N positions of every row's current block (one call
for the whole batch) and returns ``(confidence, tokens)``, both (B, N): the token proposed for each
position and a float64 score; the sampler commits the highest-scoring still-masked positions
(``choose_positions``). Tokens are drawn from

    p = softmax(filter_top_p(filter_top_k(logits / T)))           (T = temperature)

with ``x = argmax p`` when T = 0 (greedy) and ``x ~ Categorical(p)`` otherwise. The scores:

    random          c_i ~ U(0, 1)                    Dream ``origin``: unmask uniformly at random
    low_confidence  c_i = p_i(x_i)                   LLaDA low-confidence remasking / MaskGIT
    margin          c_i = p_i(top1) - p_i(top2)      Dream ``topk_margin``
    entropy         c_i = sum_v p_iv log p_iv        Dream ``entropy`` (negative entropy)
    left_to_right   c_i = -i                         semi-autoregressive: the leftmost [MASK] first

With a threshold τ the sampler commits every [MASK] whose score exceeds τ, and at least the
highest-scoring one. ``left_to_right`` compares p_i(x_i) with τ instead of its score (the sampler's
``Proposal.probability``), so a step commits the leftmost [MASK] and every other one the model is
sure of.

``STRATEGIES`` maps the config name to the function, so the sampler never branches on strings.
All randomness comes from the row's own ``torch.Generator``, drawn at the row's still-masked
positions only (``draw_at``) and in the order the row would draw alone: the per-row answers do not
depend on the batch, and seeded sampling gives what the per-row sampler gave.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenSampling:
    """How a token is drawn from the logits: temperature (0 = greedy), top-k and top-p filters."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """(..., V) logits with everything outside the top-k / the top-p nucleus set to -inf.

    top-p keeps the smallest set of most likely tokens whose probability mass reaches ``top_p``
    (the most likely token is always kept). ``None`` (or top_k 0, top_p 1) disables a filter.
    """
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (..., V)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    sampling: TokenSampling,
    generators: Sequence[torch.Generator] | None,
    draw_at: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, V) logits -> tokens (B, N) and the float32 probabilities p (B, N, V) they come from.

    Greedy: ``x = argmax p`` everywhere, no draw. Sampling: row r draws ``x ~ Categorical(p)`` at its
    positions ``draw_at[r]`` (B, N) from ``generators[r]``, one ``multinomial`` call over those
    positions in order: the same draws as the row alone. Elsewhere the token is meaningless.
    """
    logits = logits.float()
    if sampling.temperature > 0:
        logits = logits / sampling.temperature
    logits = filter_logits(logits, sampling.top_k, sampling.top_p)
    probs = logits.softmax(dim=-1)  # (B, N, V)
    if sampling.temperature == 0:
        return probs.argmax(dim=-1), probs
    tokens = torch.zeros(probs.shape[:-1], dtype=torch.long, device=probs.device)  # (B, N)
    for row, cols in _draw_rows(draw_at, generators):  # each row owns its generator
        tokens[row, cols] = torch.multinomial(probs[row, cols], 1, generator=generators[row]).squeeze(-1)
    return tokens, probs


def _draw_rows(
    draw_at: torch.Tensor, generators: Sequence[torch.Generator] | None
) -> list[tuple[int, torch.Tensor]]:
    """(row, its drawing columns) for every row of ``draw_at`` (B, N) with something to draw.

    The only loop over rows in the sampler: a row's draws come from its own generator, so that a
    row's answer does not depend on the rest of the batch. Greedy decoding never gets here.
    """
    if generators is None or len(generators) != draw_at.shape[0]:
        raise ValueError("random draws need one torch.Generator per row of the batch")
    rows = draw_at.any(dim=-1).nonzero().squeeze(-1).tolist()
    return [(row, draw_at[row].nonzero().squeeze(-1)) for row in rows]


def token_probability(logits: torch.Tensor, sampling: TokenSampling, tokens: torch.Tensor) -> torch.Tensor:
    """(B, N) float64 p_i(x_i): the probability of the given tokens under the distribution the
    sampler draws from (temperature and filters applied; 0 where a filter removed x_i)."""
    logits = logits.float()
    if sampling.temperature > 0:
        logits = logits / sampling.temperature
    probs = filter_logits(logits, sampling.top_k, sampling.top_p).softmax(dim=-1)  # (B, N, V)
    return probs.gather(-1, tokens[..., None]).squeeze(-1).double()


# (logits (B, N, V), sampling, one generator per row, draw_at (B, N)) -> (confidence (B, N) float64,
# tokens (B, N)); only the ``draw_at`` positions are meaningful
Strategy = Callable[
    [torch.Tensor, TokenSampling, Sequence[torch.Generator] | None, torch.Tensor],
    tuple[torch.Tensor, torch.Tensor],
]


def random_order(
    logits: torch.Tensor,
    sampling: TokenSampling,
    generators: Sequence[torch.Generator] | None,
    draw_at: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_i ~ U(0, 1): the positions to unmask are chosen uniformly at random (Dream ``origin``)."""
    tokens, _ = sample_tokens(logits, sampling, generators, draw_at)
    confidence = torch.zeros(tokens.shape, dtype=torch.float64, device=tokens.device)  # (B, N)
    for row, cols in _draw_rows(draw_at, generators):  # after the row's token draws, as alone
        confidence[row, cols] = torch.rand(
            cols.numel(), generator=generators[row], device=tokens.device, dtype=torch.float64
        )
    return confidence, tokens


def low_confidence(
    logits: torch.Tensor,
    sampling: TokenSampling,
    generators: Sequence[torch.Generator] | None,
    draw_at: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_i = p_i(x_i), the probability of the proposed token (LLaDA low-confidence remasking)."""
    tokens, probs = sample_tokens(logits, sampling, generators, draw_at)
    return probs.gather(-1, tokens[..., None]).squeeze(-1).double(), tokens


def margin(
    logits: torch.Tensor,
    sampling: TokenSampling,
    generators: Sequence[torch.Generator] | None,
    draw_at: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_i = p_i(top1) - p_i(top2), the gap between the two most likely tokens."""
    tokens, probs = sample_tokens(logits, sampling, generators, draw_at)
    top2 = torch.topk(probs.double(), 2, dim=-1).values  # (B, N, 2)
    return top2[..., 0] - top2[..., 1], tokens


def entropy(
    logits: torch.Tensor,
    sampling: TokenSampling,
    generators: Sequence[torch.Generator] | None,
    draw_at: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_i = sum_v p_iv log p_iv, the negative entropy of position i (0 log 0 = 0)."""
    tokens, probs = sample_tokens(logits, sampling, generators, draw_at)
    p = probs.double()
    return torch.xlogy(p, p).sum(dim=-1), tokens


def left_to_right(
    logits: torch.Tensor,
    sampling: TokenSampling,
    generators: Sequence[torch.Generator] | None,
    draw_at: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_i = -i, the position in the block: the leftmost [MASK] first (semi-autoregressive order).

    With one commit per step inside blocks of b this decodes the answer in the order that the
    left-to-right NLL scores it; a block model of block size 1 decodes as the AR model would.
    """
    tokens, _ = sample_tokens(logits, sampling, generators, draw_at)
    position = torch.arange(tokens.shape[1], dtype=torch.float64, device=tokens.device)  # (N,)
    return (-position).expand(tokens.shape).clone(), tokens


STRATEGIES: dict[str, Strategy] = {
    "left_to_right": left_to_right,
    "random": random_order,
    "low_confidence": low_confidence,
    "margin": margin,
    "entropy": entropy,
}

# What a threshold tau in (0, 1] is compared with, per strategy that takes one: its own score c_i where
# that is probability-like ("score"), or p_i(x_i) where the score is an order ("probability":
# left_to_right's c_i = -i). Absent: no threshold (entropy's c_i = -H <= 0, random's a uniform draw).
THRESHOLD_ON: dict[str, str] = {"low_confidence": "score", "margin": "score", "left_to_right": "probability"}


def _ranking_key(confidence: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, N) float64: the confidence of every candidate (clamped to the lowest finite value, so
    that even a -inf candidate ranks before every non-candidate), -inf for the rest."""
    lowest = torch.finfo(torch.float64).min
    return torch.where(candidates, confidence.double().clamp_min(lowest), float("-inf"))


def confidence_rank(confidence: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, N) rank of every candidate position among its row's candidates, most confident first.

    Ties go to the lower index (a stable sort); non-candidates rank after every candidate.
    """
    order = torch.sort(_ranking_key(confidence, candidates), dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)  # (B, N)


def choose_positions(
    confidence: torch.Tensor,
    candidates: torch.Tensor,
    num: torch.Tensor | int | None = None,
    threshold: float | torch.Tensor | None = None,
    score: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, N) bool: the candidate positions (``candidates`` (B, N)) to commit this step, per row.

    With ``threshold`` τ (a float, or (B,) one per row): every candidate with s_i > τ, and the
    most confident candidate (Fast-dLLM parallel decoding); s_i is ``score`` (B, N) if given (the
    token's probability, for a strategy whose confidence is not one), else c_i. Otherwise the ``num``
    ((B,) or one int for all rows) most confident candidates. Ties go to the lower index, so the
    choice is deterministic. A row without candidates commits nothing.
    """
    if threshold is not None:
        if isinstance(threshold, torch.Tensor):
            threshold = threshold[:, None]
        best = _ranking_key(confidence, candidates).argmax(dim=-1, keepdim=True)  # first of the maxima
        is_best = torch.arange(confidence.shape[-1], device=confidence.device) == best  # (B, N)
        above = (confidence if score is None else score) > threshold
        return candidates & (above | is_best)
    if num is None:
        raise ValueError("choose_positions needs either num or threshold")
    if isinstance(num, torch.Tensor):
        num = num[:, None]
    return candidates & (confidence_rank(confidence, candidates) < num)
