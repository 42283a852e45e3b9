"""Complementary masks (Fast-dLLM v2, LLaDA 2.0): every row trained twice, with a mask and its complement.

Row b is drawn once, as without the option: a time t_b and the forward process's uniforms u_{b,i}
(``diffllm.diffusion.forward``), hidden set H_b = {i in A_b : u_{b,i} < t_b} under the linear schedule
(1 - alpha(t) = t). The pair adds the same row with the complement

    H'_b = A_b \\ H_b = {i in A_b : u_{b,i} >= t_b} = {i in A_b : 1 - u_{b,i} < 1 - t_b},

which is the forward process at time 1 - t_b (1 - u is uniform too), so its ELBO weight is
w(1 - t_b) = 1 / (1 - t_b). Each answer position is hidden in exactly one half of the pair, and no
number is drawn beyond those of the row: a resumed step rebuilds the same pair.

Both halves' weights must be finite, so t is drawn in [eps, 1 - eps] (``ComplementaryTimes``: the time
sampler's t in [eps, 1), mapped affinely, the same draw). The loss is then

    sum_b [ sum_{i in H_b} w(t_b) CE_i(x_{t_b}) + sum_{i in H'_b} w(1 - t_b) CE_i(x'_{1 - t_b}) ] / Z,

with Z counting both halves (the supervised positions twice for the default normalisation): the mean
of two estimates of the same bound per supervised position, so the figure keeps its units. It costs
one forward and backward over twice the rows.

Linear schedule only: under another schedule the complement of ``u < 1 - alpha(t)`` is no mask of
the same process (``diffllm.config.schema.check_loss_recipe`` refuses the pair at start).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffllm.diffusion.keys import DrawKeys


def band_time(t: torch.Tensor, eps: float) -> torch.Tensor:
    """t in [eps, 1) -> eps + (1 - 2 eps) (t - eps) / (1 - eps) in [eps, 1 - eps): the same draw, so a
    uniform (or stratified) t stays uniform (stratified) on the band, and 1 - t lies in it too."""
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"complementary masks need time eps in [0, 0.5), got {eps}")
    return eps + (1.0 - 2.0 * eps) * (t - eps) / (1.0 - eps)


class ComplementaryTimes:
    """A time sampler whose every t (batch or keyed) is ``band_time`` of the wrapped sampler's."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.eps = float(inner.eps)
        band_time(torch.zeros(()), self.eps)  # refuses eps >= 0.5 now, not at the first step

    def __call__(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return band_time(self.inner(batch_size, device=device, generator=generator), self.eps)

    def keyed(self, keys: DrawKeys, device: torch.device | str = "cpu") -> torch.Tensor:
        return band_time(self.inner.keyed(keys, device=device), self.eps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


def complementary_pair(
    batch: Mapping[str, torch.Tensor], t: torch.Tensor, hidden: torch.Tensor, mask_id: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The doubled batch: rows 0..B-1 as drawn (t, ``hidden``), rows B..2B-1 the same rows at 1 - t with
    the complement of their mask in the answer span.

    batch:  the (B, L) tensors of the rows (``input_ids``, ``answer_mask``, ...); each is repeated
    t:      (B,) the rows' times (in [eps, 1 - eps]); hidden: (B, L) bool, their masks
    Returns (batch (2B, L) each, t (2B,), xt (2B, L), hidden (2B, L)).
    """
    answer_mask = batch["answer_mask"].bool()
    complement = answer_mask & ~hidden  # (B, L)
    pairs = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    both = torch.cat([hidden, complement])  # (2B, L)
    xt = torch.where(both, torch.full_like(pairs["input_ids"], mask_id), pairs["input_ids"])
    return pairs, torch.cat([t, 1.0 - t]), xt, both
