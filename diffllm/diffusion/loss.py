"""The masked-diffusion training loss.

For a batch with answer spans A_b, hidden set H_b ⊂ A_b at times t_b:

    loss = sum_b sum_{i in H_b} w(t_b) * CE(p_theta(. | x_t)_i, x0_i)  /  sum_b |A_b|

i.e. the ELBO's per-token cross-entropy, normalised by the number of answer tokens in the batch,
so its expectation over t and the masking is an upper bound on the answer NLL per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_diffusion_loss(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, normaliser: torch.Tensor | float
) -> torch.Tensor:
    """Weighted cross-entropy over the hidden positions.

    logits:     (N, V) predictions at the N hidden positions (already shift-aligned)
    targets:    (N,)   the clean tokens there
    weights:    (N,)   w(t) of each position's row
    normaliser: the number of answer tokens the sum is divided by
    """
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    return (ce * weights).sum() / normaliser
