"""The diffusion model's NLL of an answer revealed in one fixed order (the gap decomposed).

For an answer of n tokens (the canvas: ``answer_mask``) the NLL of the reveal order pi is the
teacher-forced chain

    N_pi = sum_{j=1..n} -log p_theta(x_{pi(j)} | prompt, x_{pi(1..j-1)}, [MASK] at pi(j..n)),

one forward pass per step. Averaged over all n! orders it is the ELBO: a hidden set S of size s is
the masked set of the step that reveals i in S in (n - s)! (s - 1)! orders, so
mean_pi N_pi = sum_S (s-1)! (n-s)! / n! sum_{i in S} -log p(x_i | x with S masked), exactly
``likelihood.exact_elbo_nll``. Left to right (pi = identity) is the order an AR model uses, so

    bound - AR NLL  =  (bound - L2R)     the cost of averaging over every order
                     + (L2R - AR NLL)    what the conversion lost on the AR model's own order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from diffllm.model.dlm import DiffusionLM


@torch.no_grad()
def order_nll(
    dlm: DiffusionLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    answer_mask: torch.Tensor,
    orders: Sequence[Sequence[int]] | None = None,
    *,
    chunk_size: int = 256,
) -> torch.Tensor:
    """(B,) float64 NLL sums of each row's answer revealed one token at a time in a fixed order.

    ``orders[b]``: a permutation of ``range(n_b)`` over row b's answer positions (in position order);
    None: left to right. One forward row per answer token (n_b per row), chunked by ``chunk_size``;
    left to right on a block model, ``block_size`` passes over all rows (``blockwise_l2r_nll``).
    """
    if orders is None and dlm.block_size is not None:
        return blockwise_l2r_nll(dlm, input_ids, attention_mask, answer_mask)
    answer_mask = answer_mask.bool()
    batch_size, length = input_ids.shape
    device = input_ids.device
    canvases, targets, attn, canvas_mask_of, originals, owner = [], [], [], [], [], []
    for b in range(batch_size):
        positions = answer_mask[b].nonzero()[:, 0]  # (n,)
        n = positions.numel()
        if n == 0:
            continue
        order = torch.arange(n) if orders is None else torch.as_tensor(list(orders[b]))
        if sorted(order.tolist()) != list(range(n)):
            raise ValueError(f"orders[{b}] = {order.tolist()} is not a permutation of range({n})")
        revealed_at = torch.empty(n, dtype=torch.long)
        revealed_at[order] = torch.arange(n)  # step at which each answer position is revealed
        revealed_at = revealed_at.to(device)
        steps = torch.arange(n, device=device)[:, None]  # (n, 1)
        masked = torch.zeros(n, length, dtype=torch.bool, device=device)
        masked[:, positions] = revealed_at[None, :] >= steps  # step j: positions revealed at >= j
        target = torch.zeros_like(masked)
        target[:, positions] = revealed_at[None, :] == steps
        originals.append(input_ids[b].expand(n, -1))
        canvases.append(torch.where(masked, dlm.mask_id, originals[-1]))
        targets.append(target)
        canvas_mask_of.append(answer_mask[b].expand(n, -1))
        if attention_mask is not None:
            attn.append(attention_mask[b].expand(n, -1))
        owner += [b] * n
    out = torch.zeros(batch_size, dtype=torch.float64)
    if not canvases:
        return out
    xt, tgt, canvas_mask = torch.cat(canvases), torch.cat(targets), torch.cat(canvas_mask_of)
    mask = torch.cat(attn) if attn else None
    x0 = torch.cat(originals)
    ce = torch.zeros(xt.shape[0], dtype=torch.float64)
    for lo in range(0, xt.shape[0], chunk_size):
        sl = slice(lo, lo + chunk_size)
        # the denoising forward of training (a block model: the two-copy layout, the step's canvas
        # as the noised copy), so each step sees what the model was trained to see
        logits = dlm.noised_logits(
            x0[sl], xt[sl], tgt[sl], None if mask is None else mask[sl], canvas_mask[sl]
        )
        ce[sl] = F.cross_entropy(logits.float(), x0[sl][tgt[sl]], reduction="none").double().cpu()
    return out.index_add_(0, torch.tensor(owner), ce)


@torch.no_grad()
def blockwise_l2r_nll(
    dlm: DiffusionLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, answer_mask: torch.Tensor
) -> torch.Tensor:
    """(B,) float64 left-to-right NLL sums of a block model, in ``block_size`` passes instead of n.

    A noised block sees the prompt, the clean copies of the blocks before it and itself, never
    another noised block (``diffllm.model.blocks``). So the step that reveals answer token i (index
    j inside its block) has the same context in its block whatever the other blocks' canvases hold,
    and pass j scores every block's token j at once: answer tokens at block index >= j masked,
    targets the tokens at index j. The per-token chain of ``order_nll`` with explicit left-to-right
    orders gives the same numbers (tested) with one forward row per answer token.
    """
    answer_mask = answer_mask.bool()
    index = (answer_mask.long().cumsum(dim=1) - 1) % int(dlm.block_size)  # (B, L) index inside the block
    out = torch.zeros(input_ids.shape[0], dtype=torch.float64)
    for j in range(int(dlm.block_size)):
        target = answer_mask & (index == j)
        if not target.any():
            continue
        xt = torch.where(answer_mask & (index >= j), dlm.mask_id, input_ids)
        logits = dlm.noised_logits(input_ids, xt, target, attention_mask, answer_mask)
        ce = F.cross_entropy(logits.float(), input_ids[target], reduction="none").double().cpu()
        out.index_add_(0, target.nonzero()[:, 0].cpu(), ce)
    return out


def mean_over_orders(
    dlm: DiffusionLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, answer_mask: torch.Tensor
) -> torch.Tensor:
    """(1,) the order NLL averaged over all n! orders of a single row (tests, n <= 5)."""
    n = int(answer_mask[0].sum())
    perms = list(itertools.permutations(range(n)))
    total = torch.zeros(1, dtype=torch.float64)
    for perm in perms:
        total += order_nll(dlm, input_ids, attention_mask, answer_mask, [perm])
    return total / len(perms)
