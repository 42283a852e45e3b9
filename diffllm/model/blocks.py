"""Block diffusion (BD3-LM, Fast-dLLM v2): block-causal attention and its two-copy training layout.

The answer is cut into blocks of ``b`` positions, block k = answer positions [k b, (k + 1) b).
Every position carries a block id and a flag, clean or noised:

    prompt token i  clean,  block i - P   (P prompt tokens: one block per token, -P .. -1)
    clean answer    clean,  block k
    noised answer   noised, block k       (the canvas being denoised: [MASK]s and committed tokens)

and a query q may attend to a key j (``block_causal_allowed``) when j is not padding and

    j clean  and (blk_j < blk_q  or  (q clean and blk_j == blk_q))     earlier clean blocks, own clean block
    j noised and  q noised and blk_j == blk_q                          its own noised block

So the prompt attends causally, as in the AR model it came from, a clean block sees the prompt and
the clean blocks up to itself, and a noised block sees the prompt, the clean blocks before it and
itself. With ``b = 1`` and shift the model is the AR model: each [MASK] is predicted from the clean
copy of the token before it, which sees exactly the tokens before it.
A clean block never sees a noised one: its keys/values are final once the block is, which is what
makes the sampler's block KV cache exact.

Training layout (``two_copy_layout``): one sequence per row holding the row as it is (prompt, clean
answer, right padding: L columns) followed by the noised copy of the answer (A columns, A the
longest answer of the batch), with the noised copy's position ids repeating the clean answer's.
Every block learns in one pass: block k's noised copy sees exactly the clean blocks before it.

With shift (position i - 1 predicts token i) the source of a noised token at answer index a is

    the noised copy at a - 1                    if a is not the first of its block,
    the clean copy at a - 1 (the prompt's last  if a is the first of its block:
    token when a = 0)                             a noised block does not see the noised block before it,

not the neighbour in the concatenated sequence (``two_copy_sources``). Without shift position a
predicts itself.

Because a noised block depends only on the clean blocks before it, the diffusion ELBO of the answer
is the sum of the blocks' ELBOs, -log p(A) = sum_k -log p(A_k | A_<k) <= sum_k ELBO_k, and the
training loss keeps its form (weighted CE over the masked positions of all blocks, divided by the
answer tokens): the same nats per answer token as the full-attention bound and the AR NLL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def check_block_size(block_size: int | None, answer_pad_to: int | None) -> None:
    """A block model's blocks tile the padded answer: ``block_size`` must divide ``data.answer_pad_to``."""
    if block_size is None:
        return
    if int(block_size) < 1 or not answer_pad_to or int(answer_pad_to) % int(block_size):
        raise ValueError(
            f"model.block_size={block_size} must divide data.answer_pad_to={answer_pad_to} (answers are padded "
            f"to whole blocks); set data.answer_pad_to to a multiple of {block_size} or pick a block size dividing it"
        )


def answer_block_ids(answer_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, L) long block ids: answer index // ``block_size`` on the answer, and on the prompt before
    it one block per token, -P .. -1 (so the prompt attends causally); anything after the answer gets
    the id of the answer's column count (padding: never a key)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    answer_mask = answer_mask.bool()
    n_answer = answer_mask.sum(dim=1, keepdim=True)  # (B, 1)
    start = torch.where(n_answer > 0, answer_mask.long().argmax(dim=1, keepdim=True), answer_mask.shape[1])
    offset = torch.arange(answer_mask.shape[1], device=answer_mask.device)[None, :] - start  # (B, L)
    return torch.where(offset < 0, offset, offset // block_size)


def block_causal_allowed(
    q_block: torch.Tensor,
    q_clean: torch.Tensor,
    k_block: torch.Tensor,
    k_clean: torch.Tensor,
    key_ok: torch.Tensor,
) -> torch.Tensor:
    """(B, Lq, Lk) bool "query may attend to key" of block-causal attention (module docstring).

    q_block, q_clean: (B, Lq) block ids (negative on the prompt) and clean flags of the queries;
    k_block, k_clean, key_ok: (B, Lk) the same for the keys, and False on padding keys.
    """
    qb, qc = q_block[:, :, None], q_clean.bool()[:, :, None]
    kb, kc = k_block[:, None, :], k_clean.bool()[:, None, :]
    clean_key = kc & ((kb < qb) | (qc & (kb == qb)))
    own_noised = ~qc & ~kc & (kb == qb)
    return key_ok.bool()[:, None, :] & (clean_key | own_noised)


def block_causal_pattern(canvas_mask: torch.Tensor, num_queries: int, block_size: int) -> torch.Tensor:
    """(B, Lq, Lk) block-causal "may attend" of one canvas (the sampler's layout), padding left out.

    ``canvas_mask`` (B, Lk) marks the answer over all keys (a KV cache's keys first); the queries are the
    last ``num_queries`` keys. The last key's block is the one being denoised (noised); the prompt
    and every earlier answer block are clean (committed).
    """
    block_id = answer_block_ids(canvas_mask, block_size)  # (B, Lk)
    clean = ~canvas_mask.bool() | (block_id < block_id[:, -1:])
    q = slice(canvas_mask.shape[1] - num_queries, None)
    return block_causal_allowed(block_id[:, q], clean[:, q], block_id, clean, torch.ones_like(clean))


@dataclass
class TwoCopy:
    """One training sequence per row: the row (L columns) then the noised answer copy (A columns)."""

    input_ids: torch.Tensor  # (B, L + A)
    key_ok: torch.Tensor  # (B, L + A) bool, False on padding (both parts)
    position_ids: torch.Tensor  # (B, L + A), the noised copy repeating the clean answer's
    allowed: torch.Tensor  # (B, L + A, L + A) bool, block-causal
    noised_at: torch.Tensor  # (B, L) long: column of the noised copy of each answer position (-1 off it)


def two_copy_layout(
    x0: torch.Tensor,
    xt: torch.Tensor,
    attention_mask: torch.Tensor | None,
    answer_mask: torch.Tensor,
    block_size: int,
) -> TwoCopy:
    """Build the two-copy sequence of rows ``x0`` (clean) and ``xt`` (noised), both (B, L).

    ``answer_mask`` (B, L) marks one contiguous answer span per row (the prompt before it); the
    answer's blocks start at its first token. Right padding (``attention_mask`` 0) is allowed.
    """
    answer_mask = answer_mask.bool()
    batch, length = x0.shape
    device = x0.device
    key_ok = torch.ones_like(answer_mask) if attention_mask is None else attention_mask.bool()
    n_answer = answer_mask.sum(dim=1)  # (B,)
    width = int(n_answer.max()) if batch else 0
    start = torch.where(
        n_answer > 0, answer_mask.long().argmax(dim=1), torch.zeros_like(n_answer)
    )  # (B,) first answer column
    a = torch.arange(width, device=device)  # (A,)
    in_answer = a[None, :] < n_answer[:, None]  # (B, A)
    src = (start[:, None] + a[None, :]).clamp_max(length - 1)  # (B, A) column of answer index a
    noised = torch.where(
        in_answer, xt.gather(1, src), x0.gather(1, src)
    )  # pad columns: any token, masked out
    base_pos = (key_ok.long().cumsum(dim=1) - 1).clamp_min(0)  # (B, L) right padding: the column index
    blocks = answer_block_ids(answer_mask, block_size)  # (B, L)
    copy_blocks = a[None, :].expand(batch, -1) // block_size  # (B, A)
    input_ids = torch.cat([x0, noised], dim=1)
    all_ok = torch.cat([key_ok, in_answer], dim=1)
    position_ids = torch.cat([base_pos, base_pos.gather(1, src)], dim=1)
    block_id = torch.cat([blocks, copy_blocks], dim=1)
    clean = torch.cat([torch.ones_like(key_ok), torch.zeros_like(in_answer)], dim=1)
    allowed = block_causal_allowed(block_id, clean, block_id, clean, all_ok)
    answer_index = answer_mask.long().cumsum(dim=1) - 1
    noised_at = torch.where(answer_mask, length + answer_index, torch.full_like(answer_index, -1))
    return TwoCopy(input_ids, all_ok, position_ids, allowed, noised_at)


def two_copy_sources(
    answer_mask: torch.Tensor, targets: torch.Tensor, block_size: int, shift: bool, length: int
) -> torch.Tensor:
    """(N,) columns of the two-copy sequence whose hidden states predict the N True ``targets``.

    ``targets`` (B, L), a subset of ``answer_mask``, in row-major order; returns flat indices into
    the (B * (L + A)) hidden states, ``row * (L + A) + column``, with A the longest answer.
    With shift the first token of a block is read from the clean copy of the token before it
    (module docstring); a plain roll by one would read the noised copy of the previous block.
    """
    answer_mask, targets = answer_mask.bool(), targets.bool()
    if (targets & ~answer_mask).any():
        raise ValueError("targets must lie inside answer_mask (only answer tokens are predicted)")
    width = int(answer_mask.sum(dim=1).max())
    answer_index = answer_mask.long().cumsum(dim=1) - 1  # (B, L)
    rows, cols = targets.nonzero(as_tuple=True)
    a = answer_index[rows, cols]  # (N,)
    column = length + a  # the noised copy of the target
    if shift:
        if ((a == 0) & (cols == 0)).any():
            raise ValueError("with shift=True the answer needs at least one prompt token before it")
        first = a % block_size == 0
        column = torch.where(first, cols - 1, column - 1)
    return rows * (length + width) + column
