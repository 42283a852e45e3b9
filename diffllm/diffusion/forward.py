"""The forward (noising) process: hide answer tokens with probability 1 - alpha(t)."""

from __future__ import annotations

import torch


def forward_process(
    x0: torch.Tensor,
    answer_mask: torch.Tensor,
    mask_prob: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt the answer span of ``x0``.

    x0:          (B, L) clean token ids
    answer_mask: (B, L) bool, True where a token may be hidden (answer + EOS); the prompt never is
    mask_prob:   (B,)   probability 1 - alpha(t_b) of hiding each answer token of row b

    Returns ``xt`` (B, L) with hidden tokens replaced by ``mask_id``, and ``hidden`` (B, L) bool.
    """
    u = torch.rand(x0.shape, device=x0.device, generator=generator)
    hidden = answer_mask & (u < mask_prob[:, None])
    xt = torch.where(hidden, torch.full_like(x0, mask_id), x0)
    return xt, hidden
