"""The forward (noising) process: hide answer tokens with probability 1 - alpha(t).

    hidden_{b,i} = answer_mask_{b,i} and u_{b,i} < 1 - alpha(t_b),   u_{b,i} ~ U[0, 1)
    xt_{b,i}     = [MASK] if hidden_{b,i} else x0_{b,i}

Validation draws u from one generator for the batch (``forward_process``). Training draws row b's
u from the "mask" stream of its key (seed, optimizer step, global row index)
(``keyed_forward_process``, see ``diffllm.diffusion.keys``): u_{b,i} is the i-th number of that
stream, so a row is masked the same way whichever ranks, micro-batches or padded length it lands in.
"""

from __future__ import annotations

import torch

from diffllm.diffusion.keys import DrawKeys


def hide(
    x0: torch.Tensor, answer_mask: torch.Tensor, mask_prob: torch.Tensor, mask_id: int, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide answer token (b, i) where ``u[b, i] < mask_prob[b]``; returns ``(xt, hidden)``, both (B, L)."""
    hidden = answer_mask & (u < mask_prob[:, None])
    xt = torch.where(hidden, torch.full_like(x0, mask_id), x0)
    return xt, hidden


def forward_process(
    x0: torch.Tensor,
    answer_mask: torch.Tensor,
    mask_prob: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt the answer span of ``x0`` with numbers from one generator for the whole batch.

    x0:          (B, L) clean token ids
    answer_mask: (B, L) bool, True where a token may be hidden (answer + EOS); the prompt never is
    mask_prob:   (B,)   probability 1 - alpha(t_b) of hiding each answer token of row b

    Returns ``xt`` (B, L) with hidden tokens replaced by ``mask_id``, and ``hidden`` (B, L) bool.
    """
    u = torch.rand(x0.shape, device=x0.device, generator=generator)
    return hide(x0, answer_mask, mask_prob, mask_id, u)


def keyed_forward_process(
    x0: torch.Tensor, answer_mask: torch.Tensor, mask_prob: torch.Tensor, mask_id: int, keys: DrawKeys
) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward_process`` with row b's numbers from the "mask" stream of ``keys`` (module docstring)."""
    if len(keys.rows) != x0.shape[0]:
        raise ValueError(f"{len(keys.rows)} draw keys for a batch of {x0.shape[0]} rows")
    u = keys.uniform("mask", x0.shape[1], device=x0.device)  # (B, L)
    return hide(x0, answer_mask, mask_prob, mask_id, u)
