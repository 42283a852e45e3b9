"""One evaluation of "diffusion vs AR", on top of the scoring core (``diffllm.evaluation.scoring``).

Every figure the project reports comes through here: validation
(``DiffusionLitModule.validation_step`` -> ``validation_scores``), the end-of-run report
(``report.build_report`` -> ``compare``), ``evaluate`` (``eval_report.evaluate_models``: ``compare`` plus its extras) and
the tiny-asset builder (``ar_answer_nll``, ``ar_answers``, ``exact_match_by_task``,
``unigram_cross_entropy``). So the choices are made once:

* the schedule of the bound: ``scoring.EVAL_SCHEDULE`` (linear), whatever trains;
* the likelihood estimator: ``likelihood_settings`` (a run's ``val_likelihood`` node over
  ``DEFAULT_LIKELIHOOD``);
* the seed: batch i of the scored rows draws from ``validation_seed(seed, i)``, with the run's seed;
* exact match: ``metrics.exact_match`` (whitespace-normalised strings);
* the AR baseline decodes greedily with [MASK] suppressed (``scoring.ar_answers``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from diffllm.diffusion.likelihood import validation_seed
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.evaluation.metrics import exact_match, unigram_cross_entropy
from diffllm.evaluation.names import reference_model
from diffllm.evaluation.quality import answer_quality
from diffllm.evaluation.scoring import (
    EVAL_SCHEDULE,
    Answers,
    ar_answers,
    diffusion_answers,
    likelihood_figures,
    paired_difference,
    quality,
    row_matches,
    score_batch,
    score_rows,
)
from diffllm.evaluation.sweep import quality_vs_compute
from diffllm.model.dlm import DiffusionLM

__all__ = [
    "DEFAULT_LIKELIHOOD",
    "EVAL_SCHEDULE",
    "answer_tokens",
    "compare",
    "eval_batches",
    "exact_match_by_task",
    "generation_figures",
    "likelihood_settings",
    "per_row_figures",
    "validation_scores",
]

# The likelihood estimator when a run config has no ``val_likelihood`` node (diffllm.diffusion.likelihood).
DEFAULT_LIKELIHOOD: dict[str, Any] = {"num_samples": 4, "method": "grid"}

NUM_EXAMPLES = 8
UNIGRAM_TRAIN_ROWS = 20_000  # training rows the unigram reference is fit on


def likelihood_settings(node: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """``{num_samples, method}`` of the bound's estimator: ``DEFAULT_LIKELIHOOD``, then a run's
    ``val_likelihood`` node, then ``overrides`` that are not None."""
    out = {**DEFAULT_LIKELIHOOD, **{k: v for k, v in dict(node or {}).items() if k in DEFAULT_LIKELIHOOD}}
    out.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(out) - set(DEFAULT_LIKELIHOOD))
    if unknown:
        raise ValueError(
            f"unknown likelihood setting(s) {unknown}; the keys are {sorted(DEFAULT_LIKELIHOOD)}"
        )
    return {"num_samples": int(out["num_samples"]), "method": str(out["method"])}


# ----------------------------------------------------------------------------------- rows


def eval_batches(dataset, collate, batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
    """Consecutive padded batches of ``dataset`` rows, as the (unshuffled) validation loader builds them."""
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def answer_tokens(rows: Iterable[Mapping[str, Any]], limit: int | None = None) -> list[int]:
    """The scored token ids (``score_mask``: answer + end token) of encoded rows, in order."""
    out: list[int] = []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        out.extend(t for t, m in zip(row["input_ids"], row.get("score_mask", row["answer_mask"])) if m)
    return out


# ----------------------------------------------------------------------------------- validation


def validation_scores(
    batch: Mapping[str, torch.Tensor],
    batch_idx: int,
    *,
    seed: int,
    likelihood: Mapping[str, Any] | None,
    end_id: int,
    **models: DiffusionLM,
) -> dict[str, torch.Tensor]:
    """``scoring.score_batch`` of validation batch ``batch_idx``: masks and times from
    ``validation_seed(seed, batch_idx)`` (``seed``: the run's), estimator from ``likelihood_settings``."""
    return score_batch(
        batch,
        seed=validation_seed(seed, batch_idx),
        end_id=end_id,
        **likelihood_settings(likelihood),
        **models,
    )


# ----------------------------------------------------------------------------------- generation


def generation_figures(answers: Mapping[str, Answers], refs: Sequence[str]) -> dict[str, Any]:
    """Quality of each model's answers (keys ``<model>_<metric>``) and exact-match differences
    against ``names.reference_model`` (AR-SFT when present, else the base) on the same prompts,
    paired SEs."""
    out: dict[str, Any] = {}
    for model, a in answers.items():
        out.update({f"{model}_{k}": v for k, v in quality(a, refs).items()})
    ref = reference_model(answers)
    for model in answers:
        if model != ref and ref in answers:
            diff, se = paired_difference(answers[model].texts, answers[ref].texts, refs)
            out[f"{model}_minus_{ref}_exact_match"], out[f"{model}_minus_{ref}_exact_match_se"] = diff, se
    return out


def per_row_figures(
    scores: Mapping[str, np.ndarray], answers: Mapping[str, Answers], refs: Sequence[str]
) -> dict[str, dict[str, list]]:
    """The per-row figures every headline number is pooled from, as plain lists (for ``eval.json``).

    ``scored``: for each scored row, its token counts (``tokens``, ``tokens_no_end``) and each model's
    NLL summed over them in nats (keys of ``scoring.score_batch``: ``diffusion``, ``ar_base``,
    ``ar_sft``, ...); a per-token figure is sum(model) / sum(tokens), a gap sum(a - b) / sum(tokens).
    ``generated``: for each generated prompt, ``<model>_match`` (1.0 when the answer equals the
    reference, whitespace-normalised), ``<model>_length`` (tokens before the end token) and
    ``<model>_ended`` (the end token was produced); an exact-match difference is
    mean(a_match - b_match), its SE sd / sqrt(m).
    """
    scored = {k: [int(x) if k.startswith("tokens") else float(x) for x in v] for k, v in scores.items()}
    generated: dict[str, list] = {}
    for model, a in answers.items():
        generated[f"{model}_match"] = row_matches(a.texts, refs)
        generated[f"{model}_length"] = [int(n) for n in a.lengths]
        generated[f"{model}_ended"] = [bool(e) for e in a.ended]
    return {"scored": scored, "generated": generated}


def exact_match_by_task(
    tasks: Sequence[str | None], refs: Sequence[str], **preds: Sequence[str] | None
) -> list[dict[str, Any]]:
    """Exact match (``metrics.exact_match``) per task, for every model's predictions given.

    ``tasks``: each row's task (the tiny tasks carry one; Alpaca rows do not, None). Returns
    ``[{task, rows, <model>_exact_match, ...}]`` sorted by task, or [] when no row has a task;
    rows without one are grouped under "(none)". Models given as None are left out.
    """
    names = [str(t or "(none)") for t in tasks]
    if set(names) <= {"(none)"}:
        return []
    out = []
    for task in sorted(set(names)):
        idx = [i for i, t in enumerate(names) if t == task]
        task_refs = [refs[i] for i in idx]
        row: dict[str, Any] = {"task": task, "rows": len(idx)}
        for model, texts in preds.items():
            if texts is not None:
                row[f"{model}_exact_match"] = exact_match([texts[i] for i in idx], task_refs)
        out.append(row)
    return out


# ----------------------------------------------------------------------------------- the comparison


@torch.no_grad()
def compare(
    *,
    scored,
    train,
    collate,
    batch_size: int,
    prompts: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    eos_id: int,
    config: SamplerConfig,
    seed: int,
    device: torch.device | str,
    likelihood: Mapping[str, Any],
    gen_batch_size: int,
    diffusion: DiffusionLM | None = None,
    ar_base: DiffusionLM | None = None,
    ar_sft: DiffusionLM | None = None,
    progress: Any = None,
    l2r_nll: bool = False,
    quality: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Answers]]:
    """The models given, on the same rows: (figures, per-row scores, answers per model).

    ``scored``: encoded rows whose answers are scored (batches of ``batch_size``, batch i seeded
    ``validation_seed(seed, i)``); ``train``: encoded training rows (the unigram reference);
    ``prompts``: ``datamodule.sample_prompts`` rows whose answers are generated (``diffusion``:
    the sampler with ``config``; ``ar_sft``: greedy, adapters on; ``ar_base``: greedy, adapters
    off, [MASK] suppressed; at most ``config.gen_length`` new tokens). ``progress`` wraps the
    batch iterator (e.g. ``tqdm``). Answer keys: ``diffusion``, ``ar_sft``, ``ar_base`` (``names.MODELS``).
    ``l2r_nll``: the diffusion model's left-to-right NLL too (the gap decomposed, ``diffusion.order``);
    ``quality`` (``enabled``, ``rows``, ``tokens_per_step``): reference-free answer quality of every
    model's answers and the diffusion sampler's quality vs compute on the first ``rows`` prompts,
    both scored by ``ar_base`` (``diffllm.evaluation.quality``).
    """
    models = {"diffusion": diffusion, "ar_base": ar_base, "ar_sft": ar_sft}
    models = {k: m for k, m in models.items() if m is not None}
    batches = eval_batches(scored, collate, batch_size)
    scores = score_rows(
        progress(batches) if progress is not None else batches,
        seed=seed,
        device=device,
        end_id=eos_id,
        l2r_nll=l2r_nll,
        **likelihood_settings(likelihood),
        **models,
    )
    unigram = unigram_cross_entropy(
        answer_tokens(train, limit=UNIGRAM_TRAIN_ROWS), answer_tokens(scored), vocab_size=len(tokenizer)
    )
    prompt_ids = [p["prompt_ids"] for p in prompts]
    refs = [p["reference"] for p in prompts]
    answers: dict[str, Answers] = {}
    if diffusion is not None:
        answers["diffusion"] = diffusion_answers(
            diffusion, tokenizer, prompt_ids, config, eos_id=eos_id, seed=seed, batch_size=gen_batch_size
        )
    for key, model, adapters in (("ar_sft", ar_sft, True), ("ar_base", ar_base, False)):
        if model is not None:
            answers[key] = ar_answers(
                model,
                tokenizer,
                prompt_ids,
                config.gen_length,
                eos_id=eos_id,
                batch_size=gen_batch_size,
                adapters=adapters,
            )
    extra: dict[str, Any] = {}
    if quality and quality.get("enabled") and ar_base is not None:
        rows = min(int(quality["rows"]), len(prompt_ids))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
        extra["quality_rows"] = rows
        extra["reference_free"] = answer_quality(
            answers,
            prompt_ids,
            ar_model=ar_base,
            end_id=eos_id,
            pad_id=pad,
            rows=rows,
            batch_size=gen_batch_size,
        )
        if diffusion is not None:
            extra["quality_vs_compute"] = quality_vs_compute(
                diffusion,
                tokenizer,
                prompt_ids[:rows],
                refs[:rows],
                config,
                eos_id=eos_id,
                seed=seed,
                batch_size=gen_batch_size,
                tokens_per_step=list(quality["tokens_per_step"]),
                ar_model=ar_base,
            )
    figures = {
        **likelihood_figures(scores),
        "unigram_ce": unigram,
        **generation_figures(answers, refs),
        **extra,
        "examples": [
            {"prompt": p["prompt"], "reference": r, **{m: a.texts[i] for m, a in answers.items()}}
            for i, (p, r) in enumerate(list(zip(prompts, refs))[:NUM_EXAMPLES])
        ],
    }
    return figures, scores, answers
