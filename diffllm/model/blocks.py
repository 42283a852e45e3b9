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

The clean stream (``model.clean_stream``, ``CLEAN_STREAMS``): ``block`` is the rule above (a clean
query sees its whole clean block); ``causal`` makes the clean stream token-causal, the AR model's own
attention (Fast-dVLM):

    j clean and q clean and blk_j == blk_q   only if  col_j <= col_q        (col: the column index)

so the clean copy's hidden states are those of the causal model whatever the block size, and it can
carry a next-token loss (``loss.ar_weight``). A noised block still sees whole earlier clean blocks,
and a clean block's last token sees the same keys under both rules: with shift, the first token of
every block is predicted from the same context either way.

Training layout (``two_copy_layout``): one sequence per row holding the row as it is (prompt, clean
answer, right padding: L columns) followed by the noised copy of the answer (A columns, A the
longest answer of the batch), with the noised copy's position ids repeating the clean answer's.
Every block learns in one pass: block k's noised copy sees exactly the clean blocks before it.
Several noisings of the same rows (``loss.complementary``'s pair) share one clean row: the sequence
is the row then K noised copies (L + K A columns), a noised block seeing its own copy's block only,
so each copy's hidden states equal those of its own two-copy sequence while the clean stream, which
sees no noised column, is computed once.

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

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# model.clean_stream: how a clean token attends inside its own block (module docstring)
CLEAN_STREAMS = ("block", "causal")


def check_clean_stream(clean_stream: str) -> str:
    """``clean_stream`` if it is one of ``CLEAN_STREAMS``, else a ValueError naming the key."""
    if clean_stream not in CLEAN_STREAMS:
        raise ValueError(f"model.clean_stream={clean_stream!r} is not one of {' | '.join(CLEAN_STREAMS)}")
    return clean_stream


def check_block_schedule(
    schedule: Sequence[Sequence[int]] | None, block_size: int | None, answer_pad_to: int | None
) -> None:
    """A block-size curriculum (``model.block_schedule``): ``[[step, size], ...]`` pairs in optimizer
    steps, the first at step 0, steps strictly increasing, every size a positive int dividing
    ``data.answer_pad_to``, the last size ``model.block_size`` (the size the model is measured,
    sampled and exported at). ValueError naming the key and the fix otherwise."""
    if schedule is None:
        return
    key = f"model.block_schedule={[list(p) for p in schedule]}"
    if block_size is None:
        raise ValueError(f"{key} needs model.attention=block_causal and its final model.block_size")
    pairs = [list(p) for p in schedule]
    if not pairs or any(len(p) != 2 or not all(isinstance(v, int) for v in p) for p in pairs):
        raise ValueError(f"{key}: give a non-empty list of [optimizer_step, block_size] integer pairs")
    steps = [p[0] for p in pairs]
    if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(
            f"{key}: its steps must start at 0 and increase strictly (e.g. [[0, 1], [150, 2], [300, 4]])"
        )
    for _, size in pairs:
        if size < 1 or not answer_pad_to or int(answer_pad_to) % size:
            raise ValueError(
                f"{key}: block size {size} must divide data.answer_pad_to={answer_pad_to} (answers are "
                "padded to whole blocks); use sizes dividing it"
            )
    if pairs[-1][1] != block_size:
        raise ValueError(
            f"{key} ends at block size {pairs[-1][1]}, not model.block_size={block_size} (the size the model "
            f"is validated, sampled and exported at); end the schedule with [step, {block_size}]"
        )


def scheduled_block_size(schedule: Sequence[Sequence[int]] | None, step: int) -> int | None:
    """The block size in force at optimizer step ``step`` (0-based): the size of the last pair whose
    step is <= ``step``; None without a schedule. A pure function of the step, so a resumed run
    trains at the size the uninterrupted one would."""
    if not schedule:
        return None
    size = None
    for start, block in schedule:
        if start > step:
            break
        size = int(block)
    return size


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
    *,
    clean_stream: str = "block",
    q_column: torch.Tensor | None = None,
    k_column: torch.Tensor | None = None,
    copy: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, Lq, Lk) bool "query may attend to key" of block-causal attention (module docstring).

    q_block, q_clean: (B, Lq) block ids (negative on the prompt) and clean flags of the queries;
    k_block, k_clean, key_ok: (B, Lk) the same for the keys, and False on padding keys.
    clean_stream: ``block`` or ``causal``; ``causal`` needs the columns of the queries (Lq,) and the
    keys (Lk,), in the sequence's order (a clean key of the query's own block after it is refused).
    copy: (Lq,) == (Lk,) the noised copy each column belongs to when one sequence holds several
    (``two_copy_layout`` with ``copies`` > 1; any value on clean columns): a noised query sees the
    noised keys of its own block in its own copy only. None: one noised copy.
    """
    qb, qc = q_block[:, :, None], q_clean.bool()[:, :, None]
    kb, kc = k_block[:, None, :], k_clean.bool()[:, None, :]
    own_clean = qc & (kb == qb)
    if check_clean_stream(clean_stream) == "causal":
        if q_column is None or k_column is None:
            raise ValueError("clean_stream='causal' needs the query and key columns")
        own_clean = own_clean & (k_column[None, None, :] <= q_column[None, :, None])
    clean_key = kc & ((kb < qb) | own_clean)
    own_noised = ~qc & ~kc & (kb == qb)
    if copy is not None:
        own_noised = own_noised & (copy[None, :, None] == copy[None, None, :])
    return key_ok.bool()[:, None, :] & (clean_key | own_noised)


def block_causal_pattern(
    canvas_mask: torch.Tensor, num_queries: int, block_size: int, clean_stream: str = "block"
) -> torch.Tensor:
    """(B, Lq, Lk) block-causal "may attend" of one canvas (the sampler's layout), padding left out.

    ``canvas_mask`` (B, Lk) marks the answer over all keys (a KV cache's keys first); the queries are the
    last ``num_queries`` keys. The last key's block is the one being denoised (noised); the prompt
    and every earlier answer block are clean (committed), attending as ``clean_stream`` says.
    """
    block_id = answer_block_ids(canvas_mask, block_size)  # (B, Lk)
    clean = ~canvas_mask.bool() | (block_id < block_id[:, -1:])
    num_keys = canvas_mask.shape[1]
    q = slice(num_keys - num_queries, None)
    column = torch.arange(num_keys, device=canvas_mask.device)  # (Lk,)
    return block_causal_allowed(
        block_id[:, q],
        clean[:, q],
        block_id,
        clean,
        torch.ones_like(clean),
        clean_stream=clean_stream,
        q_column=column[q],
        k_column=column,
    )


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
    clean_stream: str = "block",
    *,
    copies: int = 1,
) -> TwoCopy:
    """Build the two-copy sequence of rows ``x0`` (clean) and ``xt`` (noised), both (B, L).

    ``answer_mask`` (B, L) marks one contiguous answer span per row (the prompt before it); the
    answer's blocks start at its first token. Right padding (``attention_mask`` 0) is allowed.
    ``clean_stream``: how the clean copy attends inside its own block (module docstring).
    ``copies`` = K > 1: ``xt`` is (K * B, L), K noisings of the same B rows stacked (``xt[c * B + i]``
    noises row i), and each row's sequence holds its clean row once then the K noised answer copies
    (L + K * A columns; ``noised_at``: the first copy's columns). A noised copy sees the clean
    stream and its own block of its own copy only, so each copy's hidden states are those of its own
    two-copy sequence, and the clean stream's (which never sees a noised column) are computed once
    for the K of them: ``loss.complementary``'s pair in (L + 2A) columns instead of 2 (L + A).
    """
    answer_mask = answer_mask.bool()
    batch, length = x0.shape
    if copies < 1 or xt.shape != (copies * batch, length):
        raise ValueError(
            f"xt must be ({copies} * {batch}, {length}) for {copies} noised copies of x0's {batch} rows, "
            f"got {tuple(xt.shape)}"
        )
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
    clean_answer = x0.gather(1, src)
    noised = [  # pad columns: any token, masked out
        torch.where(in_answer, xt[c * batch : (c + 1) * batch].gather(1, src), clean_answer)
        for c in range(copies)
    ]
    base_pos = (key_ok.long().cumsum(dim=1) - 1).clamp_min(0)  # (B, L) right padding: the column index
    blocks = answer_block_ids(answer_mask, block_size)  # (B, L)
    copy_blocks = a[None, :].expand(batch, -1) // block_size  # (B, A)
    input_ids = torch.cat([x0, *noised], dim=1)
    all_ok = torch.cat([key_ok, *[in_answer] * copies], dim=1)
    position_ids = torch.cat([base_pos, *[base_pos.gather(1, src)] * copies], dim=1)
    block_id = torch.cat([blocks, *[copy_blocks] * copies], dim=1)
    clean = torch.cat([torch.ones_like(key_ok), *[torch.zeros_like(in_answer)] * copies], dim=1)
    column = torch.arange(length + copies * width, device=device)  # (L + K A,)
    copy = None if copies == 1 else (column - length).clamp_min(0) // max(width, 1)  # (L + K A,)
    allowed = block_causal_allowed(
        block_id,
        clean,
        block_id,
        clean,
        all_ok,
        clean_stream=clean_stream,
        q_column=column,
        k_column=column,
        copy=copy,
    )
    answer_index = answer_mask.long().cumsum(dim=1) - 1
    noised_at = torch.where(answer_mask, length + answer_index, torch.full_like(answer_index, -1))
    return TwoCopy(input_ids, all_ok, position_ids, allowed, noised_at)


def two_copy_sources(
    answer_mask: torch.Tensor,
    targets: torch.Tensor,
    block_size: int,
    shift: bool,
    length: int,
    *,
    copies: int = 1,
) -> torch.Tensor:
    """(N,) columns of the two-copy sequence whose hidden states predict the N True ``targets``.

    ``targets`` (B, L), a subset of ``answer_mask``, in row-major order; returns flat indices into
    the (B * (L + A)) hidden states, ``row * (L + A) + column``, with A the longest answer.
    With shift the first token of a block is read from the clean copy of the token before it
    (module docstring); a plain roll by one would read the noised copy of the previous block.
    ``copies`` = K > 1 (``two_copy_layout``'s): ``answer_mask`` is the B rows', ``targets`` is
    (K * B, L), row ``c * B + i`` a target of row i's copy c, read from copy c's columns of the
    (B * (L + K A)) hidden states, in the row-major order of the (K * B, L) targets.
    """
    answer_mask, targets = answer_mask.bool(), targets.bool()
    if targets.shape != (copies * answer_mask.shape[0], answer_mask.shape[1]):
        raise ValueError(
            f"targets must be ({copies} * {answer_mask.shape[0]}, {answer_mask.shape[1]}) for {copies} noised "
            f"copies of answer_mask's rows, got {tuple(targets.shape)}"
        )
    if (targets & ~answer_mask.repeat(copies, 1)).any():
        raise ValueError("targets must lie inside answer_mask (only answer tokens are predicted)")
    width = int(answer_mask.sum(dim=1).max())
    answer_index = answer_mask.long().cumsum(dim=1) - 1  # (B, L)
    rows, cols = targets.nonzero(as_tuple=True)
    copy, rows = rows // answer_mask.shape[0], rows % answer_mask.shape[0]
    a = answer_index[rows, cols]  # (N,)
    column = length + copy * width + a  # the noised copy of the target
    if shift:
        if ((a == 0) & (cols == 0)).any():
            raise ValueError("with shift=True the answer needs at least one prompt token before it")
        first = a % block_size == 0
        column = torch.where(first, cols - 1, column - 1)
    return rows * (length + copies * width) + column


def clean_copy_sources(targets: torch.Tensor, width: int) -> torch.Tensor:
    """(N,) flat columns of the two-copy sequence whose hidden states predict the N True ``targets``
    (B, L) as the next token, in row-major order: the clean copy at i - 1 for token i,
    ``row * (L + width) + i - 1`` (``width`` = A, the noised copy's columns). With
    ``clean_stream="causal"`` these are the causal model's next-token predictions."""
    targets = targets.bool()
    if targets[:, 0].any():
        raise ValueError("position 0 has no next-token prediction; targets must follow a prompt token")
    rows, cols = targets.nonzero(as_tuple=True)
    return rows * (targets.shape[1] + width) + cols - 1
