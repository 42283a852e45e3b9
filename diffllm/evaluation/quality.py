"""Reference-free answer quality: figures that need no reference answer.

The gap decomposed (the diffusion model's left-to-right NLL) lives in ``diffusion/order.py``; quality
against compute (the sampler at k tokens per step) in ``sweep.py``.

Reference-free quality of generated answers (open-ended prompts, where one reference answer makes
exact match and ROUGE-L close to noise):

    ar_scored_nll   the original AR model's NLL per token of each answer (its end token included
                    when the answer produced one): how plausible the AR model finds it;
    ar_agreement    per position, the share of answer positions (answer + end token, up to the
                    longer of the two) where the answer equals the AR greedy answer;
    answer_length, eos_rate   tokens before the end token; share of answers that produced it;
    repetition      repeated bigrams: bigrams that already occurred earlier in the same answer,
                    over all bigrams (pooled over answers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from diffllm.diffusion.likelihood import _row_sums, causal_token_ce
from diffllm.evaluation.scoring import Answers, binomial_se, mean_se, ratio_mean_se
from diffllm.model.dlm import DiffusionLM

# ----------------------------------------------------------------------------------- reference-free


def _padded(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, L) and attention mask (B, L)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def with_end(answers: Answers, end_id: int) -> list[list[int]]:
    """Each answer's tokens with its end token appended when it produced one."""
    if answers.tokens is None:
        raise ValueError(
            "these Answers carry no token ids; build them with scoring.diffusion_answers/ar_answers"
        )
    return [list(t) + [end_id] if e else list(t) for t, e in zip(answers.tokens, answers.ended)]


@torch.no_grad()
def ar_scored_nll(
    ar_model: DiffusionLM,
    prompt_ids: Sequence[list[int]],
    answer_ids: Sequence[list[int]],
    *,
    pad_id: int,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """(sums, counts) per answer: the original AR model's NLL (adapters off, causal) of each answer's
    tokens after its prompt, in nats; an empty answer has count 0."""
    device = next(ar_model.parameters()).device
    sums, counts = np.zeros(len(answer_ids)), np.zeros(len(answer_ids), dtype=np.int64)
    for lo in range(0, len(answer_ids), batch_size):
        idx = [i for i in range(lo, min(lo + batch_size, len(answer_ids))) if answer_ids[i]]
        if not idx:
            continue
        ids, mask = _padded([list(prompt_ids[i]) + list(answer_ids[i]) for i in idx], pad_id)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        for row, i in enumerate(idx):
            scored[row, len(prompt_ids[i]) : len(prompt_ids[i]) + len(answer_ids[i])] = True
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        ce = causal_token_ce(ar_model, ids, mask, scored, adapters=False)
        row_sums = _row_sums(ce.double(), scored).cpu().numpy()
        for row, i in enumerate(idx):
            sums[i], counts[i] = row_sums[row], len(answer_ids[i])
    return sums, counts


def position_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of positions 0..max(len)-1 where both sequences hold the same token (1.0 for two empty ones)."""
    width = max(len(a), len(b))
    if width == 0:
        return 1.0
    return sum(1 for x, y in zip(a, b) if x == y) / width


def repeated_bigrams(tokens: Sequence[int]) -> tuple[int, int]:
    """(bigrams that occurred earlier in ``tokens``, all bigrams)."""
    seen, repeats = set(), 0
    grams = list(zip(tokens, tokens[1:]))
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats, len(grams)


def reference_free(
    answers: Answers,
    prompt_ids: Sequence[list[int]],
    *,
    end_id: int,
    pad_id: int,
    ar_model: DiffusionLM | None = None,
    ar_greedy: Answers | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """The reference-free figures of ``answers`` (module docstring), each with its SE where it has one."""
    n = len(answers.ended)
    full = with_end(answers, end_id)
    length, length_se = mean_se(answers.lengths)
    eos_rate = float(np.mean(answers.ended)) if n else float("nan")
    rep = np.array([repeated_bigrams(t) for t in answers.tokens], dtype=float).reshape(-1, 2)
    repetition, repetition_se = ratio_mean_se(rep[:, 0], rep[:, 1])
    out = {
        "answer_length": length,
        "answer_length_se": length_se,
        "eos_rate": eos_rate,
        "eos_rate_se": binomial_se(eos_rate, n),
        "repetition": repetition if rep[:, 1].sum() > 0 else 0.0,
        "repetition_se": repetition_se,
    }
    if ar_model is not None:
        sums, counts = ar_scored_nll(ar_model, prompt_ids, full, pad_id=pad_id, batch_size=batch_size)
        out["ar_scored_nll"], out["ar_scored_nll_se"] = ratio_mean_se(sums, counts)
    if ar_greedy is not None:
        greedy = with_end(ar_greedy, end_id)
        out["ar_agreement"], out["ar_agreement_se"] = mean_se(
            [position_agreement(a, g) for a, g in zip(full, greedy)]
        )
    return out


# ----------------------------------------------------------------------------------- in a report


def head(answers: Answers, n: int) -> Answers:
    """The first ``n`` answers (the row cap of the quality figures): every per-row field cut."""
    rows = {f.name: getattr(answers, f.name) for f in dataclasses.fields(answers)}
    return dataclasses.replace(answers, **{k: v[:n] for k, v in rows.items() if isinstance(v, list)})


def answer_quality(
    answers: dict[str, Answers],
    prompt_ids: Sequence[list[int]],
    *,
    ar_model: DiffusionLM | None,
    end_id: int,
    pad_id: int,
    rows: int,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """``reference_free`` of every model's answers on the first ``rows`` prompts; ``answers["ar_base"]``
    (the AR base's greedy answers, when given) is the agreement reference and is scored too."""
    rows = min(rows, len(prompt_ids))
    greedy = head(answers["ar_base"], rows) if "ar_base" in answers else None
    return {
        model: reference_free(
            head(a, rows),
            prompt_ids[:rows],
            end_id=end_id,
            pad_id=pad_id,
            ar_model=ar_model,
            ar_greedy=greedy,
            batch_size=batch_size,
        )
        for model, a in answers.items()
        if a.tokens is not None
    }
