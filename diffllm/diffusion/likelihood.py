"""Answer likelihoods: the diffusion NLL bound and the base AR model's NLL of the same answers.

The negative ELBO of an answer A (n tokens, the prompt always visible) is

    L = int_0^1 w(t) E_{H ~ q_t} [ sum_{i in H} -log p_theta(x0_i | x_t) ] dt,   w = -alpha'/(1-alpha),

where q_t hides each answer token independently with probability 1 - alpha(t). With alpha(0) = 1
and alpha(1) = 0, L >= -log p_theta(A | prompt): it is the figure to hold against the AR NLL.

Estimators (``elbo_nll``), each with K = ``num_samples`` noise levels and fresh masks per level:

    "grid"        t_k = (k + 1/2) / K, the midpoint rule: deterministic under ``seed``, the
                  quadrature bias is O(1/K^2), the masks add variance;
    "stratified"  t_k = (k + u_k) / K, u_k ~ U(0, 1) per row: unbiased for L.

Exact value (``exact_elbo_nll``, tiny answers only): substituting a = alpha(t), a hidden set S of
size s has weight

    int_0^1 w(t) (1 - alpha)^s alpha^(n-s) dt = int_{alpha(1)}^{alpha(0)} (1 - a)^(s-1) a^(n-s) da
                                              = B(s, n - s + 1) = (s-1)! (n-s)! / n!   (alpha: 1 -> 0),

so L = sum_{S != {}} c(|S|) sum_{i in S} -log p_theta(x0_i | x0 with S hidden), 2^n - 1 passes. It
depends on the schedule only through alpha(0) and alpha(1): every schedule with alpha(1) = 0 has
the same bound, and the schedule only changes the estimator's variance. (A schedule that stops at
alpha(1) = eps > 0, like the log-linear one, integrates to eps instead of 0: the value is then a
slight under-estimate of the true bound, so report bounds with a schedule that reaches 0.)

Both functions run under ``torch.no_grad`` and leave the train/eval mode alone: call them on a
model in eval mode (dropout off).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from diffllm.diffusion.forward import forward_process
from diffllm.diffusion.schedule import LinearSchedule, NoiseSchedule
from diffllm.model.dlm import DiffusionLM, adapters_disabled, source_positions


def grid_times(
    num_samples: int, batch_size: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(K, B) midpoint grid t_k = (k + 1/2) / K, the same for every row."""
    k = torch.arange(num_samples, device=device, dtype=torch.float32)
    return ((k + 0.5) / num_samples)[:, None].expand(num_samples, batch_size)


def stratified_times(
    num_samples: int, batch_size: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(K, B) stratified times t_kb = (k + u_kb) / K: one uniform draw in each of K strata per row."""
    k = torch.arange(num_samples, device=device, dtype=torch.float32)[:, None]
    u = torch.rand(num_samples, batch_size, device=device, generator=generator)
    return (k + u) / num_samples


def validation_seed(seed: int, batch_idx: int) -> int:
    """The mask/time seed of validation batch ``batch_idx`` of a run seeded ``seed``.

    Shared by ``DiffusionLitModule.validation_step`` and ``diffllm.cli.evaluate``, so that evaluating a
    checkpoint on the same rows reproduces its logged ``val/nll_bound`` exactly.
    """
    return seed * 1_000_003 + batch_idx


TIME_GRIDS: dict[str, Callable[..., torch.Tensor]] = {"grid": grid_times, "stratified": stratified_times}


def _row_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sums of ``values`` (N,) given in the row-major order of the True entries of ``mask``."""
    rows = mask.nonzero()[:, 0]
    out = torch.zeros(mask.shape[0], dtype=values.dtype, device=values.device)
    return out.index_add_(0, rows, values)


def _weighted_hidden_ce(
    dlm: DiffusionLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    answer_mask: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    generator: torch.Generator,
) -> torch.Tensor:
    """(B,) one-sample estimate sum_{i in H} w(t_b) CE_i of the ELBO integrand at times t (B,)."""
    xt, hidden = forward_process(input_ids, answer_mask, schedule.mask_prob(t), dlm.mask_id, generator)
    if not hidden.any():
        return torch.zeros(input_ids.shape[0], device=input_ids.device)
    logits = dlm.noised_logits(input_ids, xt, hidden, attention_mask, answer_mask)  # (N, V)
    ce = F.cross_entropy(logits.float(), input_ids[hidden], reduction="none")  # (N,)
    rows = hidden.nonzero()[:, 0]
    return _row_sums(ce * schedule.weight(t)[rows], hidden)


@torch.no_grad()
def elbo_nll(
    dlm: DiffusionLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    answer_mask: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    num_samples: int = 8,
    method: str = "grid",
    seed: int = 0,
    score_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo estimate of the answer NLL bound, per row.

    input_ids, attention_mask, answer_mask: (B, L); answer tokens are the ones hidden and scored.
    Returns (nll_sum (B,) float32: the bound summed over each row's answer tokens, in nats;
    count (B,) long: each row's number of answer tokens). Per-token figure: nll_sum.sum() / count.sum().
    Deterministic given ``seed`` (a generator on the input's device draws the masks and times).

    ``score_mask`` (B, L), a subset of ``answer_mask``: the tokens the figure is per (``count``);
    default ``answer_mask``. With EOS padding (``data.answer_pad_to``) the padding is hidden and its
    CE is summed too, so ``nll_sum`` bounds -log p(answer, padding) >= -log p(answer): still an
    upper bound on the answer's NLL, reported per answer token like ``ar_nll`` on ``score_mask``.
    """
    if method not in TIME_GRIDS:
        raise ValueError(f"unknown ELBO estimator {method!r}; choose one of {sorted(TIME_GRIDS)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    answer_mask = answer_mask.bool()
    batch_size, device = input_ids.shape[0], input_ids.device
    generator = torch.Generator(device=device).manual_seed(seed)
    times = TIME_GRIDS[method](num_samples, batch_size, device, generator)  # (K, B)
    nll = torch.zeros(batch_size, device=device)
    for t in times:
        nll += _weighted_hidden_ce(dlm, input_ids, attention_mask, answer_mask, t, schedule, generator)
    counted = answer_mask if score_mask is None else score_mask.bool()
    if (counted & ~answer_mask).any():
        raise ValueError("score_mask marks tokens outside answer_mask; it must be a subset of it")
    return nll / num_samples, counted.sum(dim=1)


def hidden_set_weight(n: int, s: int, alpha0: float = 1.0, alpha1: float = 0.0) -> float:
    """int_{alpha1}^{alpha0} (1 - a)^(s-1) a^(n-s) da: the ELBO weight of one hidden set of size s."""
    if not 1 <= s <= n:
        raise ValueError(f"hidden set size must be in [1, {n}], got {s}")
    if alpha0 == 1.0 and alpha1 == 0.0:
        return math.exp(math.lgamma(s) + math.lgamma(n - s + 1) - math.lgamma(n + 1))
    # expand (1 - a)^(s-1) binomially and integrate the polynomial term by term
    total = 0.0
    for j in range(s):
        m = n - s + j + 1
        total += math.comb(s - 1, j) * (-1) ** j * (alpha0**m - alpha1**m) / m
    return total


@torch.no_grad()
def exact_elbo_nll(
    dlm: DiffusionLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    answer_mask: torch.Tensor,
    schedule: NoiseSchedule | None = None,
    *,
    max_answer_tokens: int = 12,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact value of what ``elbo_nll`` estimates, by enumerating every hidden set.

    Costs 2^n - 1 forward rows for an n-token answer: for tests and tiny examples only. Returns
    (nll_sum (B,) float64, count (B,) long) like ``elbo_nll``. ``schedule`` matters only through
    alpha(0) and alpha(1) (default: the linear schedule, 1 -> 0).
    """
    schedule = schedule or LinearSchedule()
    ends = schedule.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    alpha0, alpha1 = float(ends[0]), float(ends[1])
    answer_mask = answer_mask.bool()
    batch_size, length = input_ids.shape
    nll = torch.zeros(batch_size, dtype=torch.float64)
    for b in range(batch_size):
        positions = answer_mask[b].nonzero()[:, 0]  # (n,)
        n = positions.numel()
        if n == 0:
            continue
        if n > max_answer_tokens:
            raise ValueError(
                f"row {b} has {n} answer tokens: enumerating 2^{n} hidden sets is too slow; "
                f"raise max_answer_tokens (now {max_answer_tokens}) or use elbo_nll"
            )
        codes = torch.arange(1, 2**n, device=input_ids.device)
        subsets = (codes[:, None] >> torch.arange(n, device=input_ids.device)) & 1 == 1  # (M, n)
        hidden = torch.zeros(subsets.shape[0], length, dtype=torch.bool, device=input_ids.device)
        hidden[:, positions] = subsets
        xt = torch.where(hidden, dlm.mask_id, input_ids[b].expand_as(hidden))
        mask_b = None if attention_mask is None else attention_mask[b].expand(hidden.shape[0], -1)
        canvas_b = answer_mask[b].expand(hidden.shape[0], -1)
        set_ce = torch.zeros(subsets.shape[0], dtype=torch.float64, device=input_ids.device)  # (M,)
        for lo in range(0, subsets.shape[0], chunk_size):
            sl = slice(lo, lo + chunk_size)
            logits = dlm.noised_logits(
                input_ids[b].expand_as(hidden)[sl],
                xt[sl],
                hidden[sl],
                None if mask_b is None else mask_b[sl],
                canvas_b[sl],
            )
            ce = F.cross_entropy(
                logits.float(), input_ids[b].expand_as(hidden)[sl][hidden[sl]], reduction="none"
            )
            set_ce[sl] = _row_sums(ce.double(), hidden[sl])
        weights = torch.tensor(
            [hidden_set_weight(n, s, alpha0, alpha1) for s in range(1, n + 1)], dtype=torch.float64
        )
        nll[b] = (weights.to(set_ce.device)[subsets.sum(dim=1) - 1] * set_ce).sum().cpu()
    return nll, answer_mask.sum(dim=1)


def causal_token_ce(
    dlm: DiffusionLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    adapters: bool = False,
) -> torch.Tensor:
    """(N,) next-token cross-entropy at the N True positions of ``targets`` (B, L), row-major order.

    Causal attention, no [MASK] input, the logits at position i - 1 predicting token i whatever
    ``dlm.shift`` is. ``adapters=False``: the original AR model (LoRA off);
    ``adapters=True``: the model as trained with causal attention (an AR-SFT model, objective=ar).
    Keeps the autograd graph: the AR-SFT training loss is its mean over the scored tokens.
    """
    targets = targets.bool()
    if targets[:, 0].any():
        raise ValueError("position 0 has no AR prediction; the answer must follow at least one prompt token")
    with nullcontext() if adapters else adapters_disabled(dlm.model):
        hidden_states = dlm.hidden_states(input_ids, attention_mask, attention="causal")  # (B, L, H)
        logits = dlm.lm_head(hidden_states[source_positions(targets, shift=True)])  # (N, V)
    return F.cross_entropy(logits.float(), input_ids[targets], reduction="none")


@torch.no_grad()
def ar_nll(
    dlm: DiffusionLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    answer_mask: torch.Tensor,
    *,
    adapters: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The AR NLL of the answer tokens: by default the base model (adapters off, causal, no [MASK]).

    Standard next-token scoring: the logits at position i - 1 predict token i, whatever
    ``dlm.shift`` is. Returns (nll_sum (B,) float32 in nats, count (B,) long), so that
    nll_sum.sum() / count.sum() equals the HF causal-LM loss with labels = -100 off the answer.
    ``adapters=True`` scores the adapted model with causal attention (an AR-SFT checkpoint).
    """
    answer_mask = answer_mask.bool()
    ce = causal_token_ce(dlm, input_ids, attention_mask, answer_mask, adapters=adapters)
    return _row_sums(ce, answer_mask), answer_mask.sum(dim=1)
