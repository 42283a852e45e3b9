"""Reference-free answer quality, and quality against compute: figures that need no reference answer.

The gap decomposed (the diffusion model's left-to-right NLL) lives in ``diffusion/order.py``.

Reference-free quality of generated answers (open-ended prompts, where one reference answer makes
exact match and ROUGE-L close to noise):

    ar_scored_nll   the original AR model's NLL per token of each answer (its end token included
                    when the answer produced one): how plausible the AR model finds it;
    ar_agreement    per position, the share of answer positions (answer + end token, up to the
                    longer of the two) where the answer equals the AR greedy answer;
    answer_length, eos_rate   tokens before the end token; share of answers that produced it;
    repetition      repeated bigrams: bigrams that already occurred earlier in the same answer,
                    over all bigrams (pooled over answers).

Quality against compute (``quality_vs_compute``): the sampler at 1, 2, 4, 8 tokens per step
(``steps = gen_length / k``), each with its exact match, AR-scored NLL and forward passes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffllm.diffusion.likelihood import _row_sums, causal_token_ce
from diffllm.diffusion.order import mean_over_orders, order_nll  # noqa: F401  (re-exported)
from diffllm.diffusion.sampler import SamplerConfig, block_config
from diffllm.evaluation.scoring import (
    Answers,
    binomial_se,
    diffusion_answers,
    mean_se,
    ratio_mean_se,
    row_matches,
)
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


# ----------------------------------------------------------------------------------- quality vs compute


def quality_vs_compute(
    dlm: DiffusionLM,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    refs: Sequence[str] | None,
    base: SamplerConfig,
    *,
    eos_id: int,
    seed: int,
    batch_size: int,
    tokens_per_step: Sequence[int] = (1, 2, 4, 8),
    ar_model: DiffusionLM | None = None,
) -> list[dict[str, Any]]:
    """The sampler at k tokens per step (``steps = gen_length / k``, schedule mode, threshold off): exact
    match (with ``refs``), AR-scored NLL (with ``ar_model``), forward passes, seconds. A k the block
    layout cannot take (steps not a multiple of the number of blocks) is reported with its reason."""
    rows = []
    base = block_config(base, getattr(dlm, "block_size", None))  # a block model decodes its own blocks
    for k in tokens_per_step:
        steps = base.gen_length // int(k)
        try:
            config = dataclasses.replace(base, steps=steps, threshold=None)
        except ValueError as err:
            rows.append({"tokens_per_step": int(k), "steps": steps, "skipped": str(err)})
            continue
        a = diffusion_answers(
            dlm, tokenizer, prompt_ids, config, eos_id=eos_id, seed=seed, batch_size=batch_size
        )
        row: dict[str, Any] = {
            "tokens_per_step": int(k),
            "steps": steps,
            "nfe": a.nfe,  # forward passes, all batches
            "nfe_per_batch": a.nfe / math.ceil(len(prompt_ids) / batch_size),
            "seconds": a.seconds,
        }
        if refs is not None:
            em = row_matches(a.texts, refs)
            row["exact_match"], row["exact_match_se"] = (
                float(np.mean(em)),
                binomial_se(float(np.mean(em)), len(em)),
            )
        if ar_model is not None:
            sums, counts = ar_scored_nll(
                ar_model, prompt_ids, with_end(a, eos_id), pad_id=tokenizer.pad_token_id or eos_id
            )
            row["ar_scored_nll"], row["ar_scored_nll_se"] = ratio_mean_se(sums, counts)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------- in a report


def head(answers: Answers, n: int) -> Answers:
    """The first ``n`` answers (the row cap of the quality figures)."""
    return dataclasses.replace(
        answers,
        texts=answers.texts[:n],
        lengths=answers.lengths[:n],
        ended=answers.ended[:n],
        tokens=None if answers.tokens is None else answers.tokens[:n],
    )


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
    """``reference_free`` of every model's answers on the first ``rows`` prompts; ``answers["ar"]`` (the
    AR base's greedy answers, when given) is the agreement reference and is scored too."""
    rows = min(rows, len(prompt_ids))
    greedy = head(answers["ar"], rows) if "ar" in answers else None
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


QUALITY_ROWS = (
    ("ar_scored_nll", "AR-scored NLL (nats/token)", 3),
    ("ar_agreement", "agreement with AR greedy", 3),
    ("answer_length", "answer tokens (mean)", 2),
    ("eos_rate", "EOS rate", 3),
    ("repetition", "repeated bigrams", 3),
)
DECOMPOSITION_ROWS = (
    ("nll_bound", "diffusion ELBO bound (all orders)"),
    ("l2r_nll", "diffusion, left to right (one order)"),
    ("ar_sft_nll", "AR-SFT"),
    ("ar_nll", "AR base"),
    ("order_cost", "bound - L2R: cost of averaging over orders"),
    ("conversion_loss", "L2R - AR base: lost by the conversion"),
    ("conversion_loss_sft", "L2R - AR-SFT"),
)


def _pm(r: dict[str, Any], key: str, digits: int = 3) -> str:
    value, se = r.get(key), r.get(f"{key}_se")
    if value is None or not math.isfinite(value):
        return "—"
    if se is None or not math.isfinite(se):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}"


def quality_tables(r: dict[str, Any], markdown: bool = False) -> list[str]:
    """The decomposition, reference-free and quality-vs-compute tables of a report (those present)."""
    lines: list[str] = []

    def table(header: list[str], rows: list[list[str]]) -> None:
        if markdown:
            lines.extend(["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)])
            lines.extend("| " + " | ".join(row) + " |" for row in rows)
        else:
            lines.append("  " + f"{header[0]:44s}" + "".join(f"{h:>18s}" for h in header[1:]))
            lines.extend("  " + f"{row[0]:44s}" + "".join(f"{c:>18s}" for c in row[1:]) for row in rows)

    if "l2r_nll" in r:
        lines += ["", "the gap decomposed (nats/token, ± SE over rows; differences paired)"]
        table(["figure", "value"], [[label, _pm(r, key)] for key, label in DECOMPOSITION_ROWS if key in r])
    rf = r.get("reference_free") or {}
    if rf:
        names = {"diffusion": "diffusion", "ar_sft": "AR-SFT", "ar": "AR base"}
        models = [m for m in names if m in rf]
        lines += [
            "",
            f"reference-free answer quality, {r.get('quality_rows', '?')} prompts (scored by the AR base)",
        ]
        table(
            ["metric", *(names[m] for m in models)],
            [[label, *(_pm(rf[m], key, digits) for m in models)] for key, label, digits in QUALITY_ROWS],
        )
    qc = r.get("quality_vs_compute") or []
    if qc:
        lines += ["", f"diffusion quality vs compute, {r.get('quality_rows', '?')} prompts (schedule mode)"]
        table(
            ["tokens per step", "steps", "forward passes", "exact match", "AR-scored NLL", "seconds"],
            [
                [str(q["tokens_per_step"]), str(q["steps"]), "—", "skipped", "—", "—"]
                if "skipped" in q
                else [
                    str(q["tokens_per_step"]),
                    str(q["steps"]),
                    str(q["nfe"]),
                    _pm(q, "exact_match"),
                    _pm(q, "ar_scored_nll"),
                    f"{q['seconds']:.2f}",
                ]
                for q in qc
            ],
        )
    return lines
