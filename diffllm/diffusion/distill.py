"""Distillation from the frozen base: keep the converted model's predictions near the AR model's.

The teacher is the model the conversion started from: the same weights with the LoRA adapters off
and causal attention, reading token i from position i - 1 (``base_next_token_logits``). It costs one
forward pass without gradients over the clean rows. At the masked positions D_b = H_b ∩ S_b of each
row (H_b the hidden set, S_b ``score_mask``: the answer and its first end token, never the EOS
padding after it, which the base model was never trained to predict) the term is

    KL_i = KL(p_base(. | x0_<i) || p_theta(. | x_t)_i)
         = sum_{v != [MASK]} p_i(v) (log p_i(v) - log q_i(v)),

with p_i, q_i the teacher's and the student's softmax renormalised without the [MASK] column (the
base model never predicts [MASK]; the converted model must not be pushed towards or away from it).
The training loss adds

    distill_weight * sum_b sum_{i in D_b} KL_i / Z

over the same normaliser Z as the diffusion term (``diffllm.training.distributed.GlobalNormaliser``:
the optimizer step's supervised positions by default), so the term is in nats per supervised position;
it is not weighted by w(t). At time t a row has about t |S_b| such positions, so with t uniform the
term is about distill_weight * |S| / (2 |A|) times the mean KL per scored token.

Block models only (``model.attention=block_causal``): there a masked token of block k is predicted
from the prompt and the clean blocks before k, the left context the teacher sees (plus the
teacher's view of the clean tokens of block k before i). At block size 1 with shift the student's
prediction is the AR model's with the adapters on: with LoRA B = 0 the term is zero.
"""

from __future__ import annotations

import torch

from diffllm.model.dlm import DiffusionLM, adapters_disabled, source_positions


@torch.no_grad()
def base_next_token_logits(
    dlm: DiffusionLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """(N, V) the base AR model's next-token logits for the N True ``targets`` (B, L), row-major.

    Adapters off, causal attention, the clean ``input_ids``; the logits at i - 1 predict token i
    whatever ``dlm.shift`` is. Call it on the inner ``DiffusionLM``, never through a DDP wrapper: it
    touches no trainable weight and must not take part in gradient synchronisation.
    """
    targets = targets.bool()
    with adapters_disabled(dlm.model):
        hidden_states = dlm.hidden_states(input_ids, attention_mask, attention="causal")  # (B, L, H)
        return dlm.lm_head(hidden_states[source_positions(targets, shift=True)])


def kl_without_mask(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(N,) KL(p || q) per position, p = softmax(teacher), q = softmax(student), both (N, V) logits
    renormalised over the vocabulary without the ``mask_id`` column (module docstring). Nats."""
    vocab = student_logits.shape[-1]
    keep = torch.arange(vocab, device=student_logits.device) != mask_id  # (V,)
    log_p = teacher_logits[:, keep].float().log_softmax(dim=-1)  # (N, V - 1)
    log_q = student_logits[:, keep].float().log_softmax(dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def distill_sum(
    dlm: DiffusionLM,
    x0: torch.Tensor,
    attention_mask: torch.Tensor | None,
    hidden: torch.Tensor,
    score_mask: torch.Tensor,
    student_logits: torch.Tensor,
    *,
    copies: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of KL_i over D = hidden ∩ score_mask, |D|): the numerator of the distillation term.

    x0, attention_mask, hidden, score_mask: (B, L); ``student_logits`` (N, V) the converted model's
    predictions at the N True positions of ``hidden``, row-major (``DiffusionLM.noised_logits``).
    ``copies`` = K: the (B, L) rows are K noisings of the same B / K clean rows stacked
    (``loss.complementary``'s pair): the teacher, which sees only the clean rows, runs once on them
    at the positions any copy distils, and each copy reads its own.
    """
    hidden = hidden.bool()
    distilled = hidden & score_mask.bool()  # (B, L)
    if not distilled.any():
        return student_logits.sum() * 0.0, distilled.sum()  # keeps the graph: every rank backwards alike
    rows = x0.shape[0] // copies
    wanted = distilled.view(copies, rows, -1).any(dim=0)  # (B / K, L) positions some copy distils
    mask = None if attention_mask is None else attention_mask[:rows]
    teacher = base_next_token_logits(dlm, x0[:rows], mask, wanted)  # (W, V), row-major over ``wanted``
    if copies > 1:  # copy c's distilled positions, in the stacked row-major order, as rows of ``teacher``
        order = torch.full(wanted.shape, -1, dtype=torch.long, device=wanted.device)
        order[wanted] = torch.arange(int(wanted.sum()), device=wanted.device)
        teacher = teacher[order.repeat(copies, 1)[distilled]]  # (D, V)
    student = student_logits[distilled[hidden]]  # (D, V): hidden's row-major order restricted to D
    return kl_without_mask(teacher, student, dlm.mask_id).sum(), distilled.sum()
