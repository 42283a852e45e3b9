"""The masked-diffusion training loss.

For a batch with answer spans A_b, hidden sets H_b ⊂ A_b drawn at times t_b:

    loss = sum_b sum_{i in H_b} c(t_b) * CE(p_theta(. | x_t)_i, x0_i)  /  Z

with a weighting c and a normaliser Z chosen by ``MaskedDiffusionLoss``:

    weighting      c(t)                            normalisation        Z
    "elbo"         w(t) = -alpha'(t)/(1-alpha(t))  "supervised_tokens"  sum_b |A_b|    (LLaDA SFT)
    "uniform"      1                               "hidden_tokens"      sum_b |H_b|    (DiffuLLaMA)
                                                   "batch_tokens"       non-pad tokens of the batch

A_b is the supervised span (``answer_mask``): the answer, its end token AND the EOS padding of
``data.answer_pad_to`` (1,024 positions for 273 answer tokens on 64 rows of the embedded default).
So "supervised_tokens" divides by the supervised positions, not by the answer tokens: its value
is an ELBO per supervised position, not per answer token, and is not comparable with the AR NLL
per answer token. The figure that is, ``val/nll_bound``, comes from ``diffllm.evaluation.scoring``: the same
ELBO estimated on the whole span and divided by the scored tokens (answer + end token) only.
(``answer_tokens``, this normalisation's name until issue 12, is still read, with a warning.)

Why ("elbo", "supervised_tokens") is the default: for each row, E_t E_{H|t}[ sum_{i in H} w(t)
CE_i ] is the continuous-time negative ELBO of the supervised span given the prompt (MDLM, LLaDA),
an upper bound on -log p_theta(span | prompt), the answer's NLL plus that of its padding given the
answer, so also on the answer's NLL. Dividing by the fixed span length keeps that expectation
intact: the loss is that bound per supervised position. Dividing by the random |H_b| instead (a ratio of random variables) or dropping w(t)
gives a fine training signal but no longer a bound.

With several rows the ratio sum_b ELBO_b / sum_b |A_b| is a position-weighted average (longer
spans count more), as in LLaDA. In training, the sums and Z run over the optimizer step's whole
global batch, all ranks and micro-batches included (``weighted_sum`` per micro-batch, ``count``
summed into ``diffllm.training.distributed.GlobalNormaliser``): a step with accumulation k on W ranks takes
the gradient of one batch of all its rows.

An AR term on the clean stream (``ar_weight`` w > 0; a block model with ``model.clean_stream=causal``,
whose clean copy is the causal model): with S_b the scored span of row b (the answer and its first end
token, as the AR-SFT objective scores it, never the EOS padding),

    loss = ( sum_b sum_{i in H_b} c(t_b) CE_i  +  w * sum_b sum_{i in S_b} -log p_theta(x_i | x_<i) ) / Z,

both sums in nats over the same global Z: the AR term is w * (AR-SFT's mean CE per scored token) *
sum_b |S_b| / Z, i.e. nats per supervised position like the diffusion term (with the default
"supervised_tokens", Z counts the EOS padding too, so w = 1 weighs one scored token's CE as much as one
supervised position's share of the bound). ``training.module.DiffusionLitModule.diffusion_loss`` adds it.

Two recipe options ride on the loss node, off by default (issue 18): ``complementary`` trains every row
with its mask and the complement of that mask (``diffllm.diffusion.complementary``; Z counts both
halves), and ``distill_weight`` adds that multiple of KL(base next-token || converted) at the masked
scored positions over the same Z (``diffllm.diffusion.distill``). ``DiffusionLitModule.diffusion_loss``
applies them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from diffllm.diffusion.schedule import NoiseSchedule


def masked_diffusion_loss(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, normaliser: torch.Tensor | float
) -> torch.Tensor:
    """Weighted cross-entropy over the hidden positions.

    logits:     (N, V) predictions at the N hidden positions (already shift-aligned)
    targets:    (N,)   the clean tokens there
    weights:    (N,)   w(t) of each position's row
    normaliser: the number of tokens the sum is divided by
    """
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    return (ce * weights).sum() / normaliser


def elbo_weight(t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """c(t) = w(t) = -alpha'(t) / (1 - alpha(t)), the continuous-time ELBO weight."""
    return schedule.weight(t.float())


def uniform_weight(t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """c(t) = 1: plain cross-entropy on the hidden tokens (MaskGIT-style, not a bound)."""
    return torch.ones_like(t, dtype=torch.float32)


WEIGHTINGS: dict[str, Callable[[torch.Tensor, NoiseSchedule], torch.Tensor]] = {
    "elbo": elbo_weight,
    "uniform": uniform_weight,
}

# normalisation name -> the keyword argument of MaskedDiffusionLoss.__call__ that holds Z
NORMALISATIONS: dict[str, str] = {
    "supervised_tokens": "n_answer",
    "hidden_tokens": "n_hidden",
    "batch_tokens": "n_tokens",
}

# Former normalisation names, still read from old configs, checkpoints and export cards.
RENAMED_NORMALISATIONS: dict[str, str] = {"answer_tokens": "supervised_tokens"}


class MaskedDiffusionLoss:
    """The weighted, normalised cross-entropy of the hidden tokens (see the module docstring).

    Call with the predictions at the N hidden positions only:

        logits (N, V), targets (N,), t_of_position (N,) = t of each position's row,
        e.g. ``t[:, None].expand_as(hidden)[hidden]`` for (B,) times and a (B, L) ``hidden`` mask;
        n_answer / n_hidden / n_tokens: batch totals (int or 0-d tensor) of supervised positions
        (``answer_mask``: answer, end token and EOS padding), hidden tokens and non-pad tokens. Only the one the normalisation names is used.

    A zero normaliser (e.g. no token hidden at tiny t with "hidden_tokens") is treated as 1, so the
    loss is 0 rather than NaN.
    """

    def __init__(
        self,
        weighting: str = "elbo",
        normalisation: str = "supervised_tokens",
        ar_weight: float = 0.0,
        complementary: bool = False,
        distill_weight: float = 0.0,
    ) -> None:
        if normalisation in RENAMED_NORMALISATIONS:
            new = RENAMED_NORMALISATIONS[normalisation]
            warnings.warn(
                f"loss normalisation {normalisation!r} is now called {new!r} (it divides by the supervised "
                f"positions, EOS padding included, not by the answer tokens); reading it as {new!r}",
                FutureWarning,
                stacklevel=2,
            )
            normalisation = new
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {sorted(WEIGHTINGS)}")
        if normalisation not in NORMALISATIONS:
            raise ValueError(
                f"unknown loss normalisation {normalisation!r}; choose one of {sorted(NORMALISATIONS)}"
            )
        if ar_weight < 0:
            raise ValueError(f"loss.ar_weight={ar_weight} must be >= 0 (0 = off)")
        if not distill_weight >= 0:
            raise ValueError(f"loss distill_weight must be >= 0, got {distill_weight}")
        self.weighting = weighting
        self.normalisation = normalisation
        self.ar_weight = float(ar_weight)  # w of the AR term (module docstring); 0 = off
        self.complementary = bool(complementary)  # recipe options (module docstring)
        self.distill_weight = float(distill_weight)

    def __call__(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        t_of_position: torch.Tensor,
        schedule: NoiseSchedule,
        *,
        n_answer: int | torch.Tensor,
        n_hidden: int | torch.Tensor,
        n_tokens: int | torch.Tensor,
    ) -> torch.Tensor:
        z = self.count(n_answer=n_answer, n_hidden=n_hidden, n_tokens=n_tokens)
        z = z.clamp_min(1) if isinstance(z, torch.Tensor) else max(z, 1)
        weights = WEIGHTINGS[self.weighting](t_of_position, schedule)  # (N,)
        return masked_diffusion_loss(logits, targets, weights, z)

    def weighted_sum(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        t_of_position: torch.Tensor,
        schedule: NoiseSchedule,
    ) -> torch.Tensor:
        """The numerator sum_b sum_{i in H_b} c(t_b) CE_i (the loss before it is divided by Z)."""
        weights = WEIGHTINGS[self.weighting](t_of_position, schedule)  # (N,)
        return masked_diffusion_loss(logits, targets, weights, 1.0)

    def count(
        self, *, n_answer: int | torch.Tensor, n_hidden: int | torch.Tensor, n_tokens: int | torch.Tensor
    ) -> int | torch.Tensor:
        """Z of these rows, unclamped: the one of the three counts the normalisation names."""
        counts = {"n_answer": n_answer, "n_hidden": n_hidden, "n_tokens": n_tokens}
        return counts[NORMALISATIONS[self.normalisation]]

    def __repr__(self) -> str:
        recipe = f", ar_weight={self.ar_weight}" if self.ar_weight else ""
        recipe += f", complementary={self.complementary}" if self.complementary else ""
        recipe += f", distill_weight={self.distill_weight}" if self.distill_weight else ""
        return f"{type(self).__name__}(weighting={self.weighting!r}, normalisation={self.normalisation!r}{recipe})"
