"""The one step-count sweep: the diffusion sampler's quality against its number of steps.

``steps_sweep`` decodes the same prompts with the same seed at each step count (schedule mode:
``threshold`` off), after the model's block layout is applied (``sampler.block_config``: a block
model decodes its own blocks, so ``steps`` must be a multiple of the number of blocks). A count the
layout or the sampler refuses is kept as a row with its reason (``skipped``), never dropped.

Two views of it: ``evaluate``'s quality vs steps (``steps_grid``; ``default_steps``: G/8, G/4, G/2,
G that the layout allows, G = ``gen_length``) and the report's quality vs compute
(``quality_vs_compute``: k tokens per step, ``steps = G // k``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from diffllm.diffusion.sampler import SamplerConfig, block_config
from diffllm.evaluation.metrics import bleu
from diffllm.evaluation.quality import ar_scored_nll, with_end
from diffllm.evaluation.scoring import diffusion_answers, quality, ratio_mean_se
from diffllm.model.dlm import DiffusionLM

# the figures of a quality-vs-compute row (report.json's quality_vs_compute), in order
COMPUTE_KEYS = (
    "tokens_per_step",
    "steps",
    "nfe",
    "nfe_per_batch",
    "seconds",
    "exact_match",
    "exact_match_se",
    "ar_scored_nll",
    "ar_scored_nll_se",
    "skipped",
)


def sweep_config(base: SamplerConfig, dlm: Any) -> SamplerConfig:
    """``base`` with the model's block layout applied (what ``generate`` decodes with)."""
    return block_config(base, getattr(dlm, "block_size", None))


def allowed(config: SamplerConfig, steps: int) -> str | None:
    """None when ``config`` can decode in ``steps`` steps (schedule mode), else the sampler's reason."""
    try:
        dataclasses.replace(config, steps=int(steps), threshold=None)
    except ValueError as err:
        return str(err)
    return None


def default_steps(base: SamplerConfig, dlm: Any = None) -> list[int]:
    """G/8, G/4, G/2, G (G = ``gen_length``) that the block layout of ``dlm`` (and of ``base``) allows."""
    config = sweep_config(base, dlm)
    grid = sorted({max(config.gen_length // d, 1) for d in (8, 4, 2, 1)})
    return [s for s in grid if allowed(config, s) is None]


def steps_sweep(
    dlm: DiffusionLM,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    base: SamplerConfig,
    steps: Sequence[int],
    *,
    eos_id: int,
    seed: int,
    batch_size: int,
    refs: Sequence[str] | None = None,
    ar_model: DiffusionLM | None = None,
) -> list[dict[str, Any]]:
    """One row per step count, in order: ``steps``, ``nfe`` (all batches), ``nfe_per_batch``,
    ``seconds``; with ``refs`` the quality figures of ``scoring.quality`` (exact match, ROUGE-L,
    answer length, EOS rate, each ± SE) and corpus ``bleu``; with ``ar_model`` the answers'
    ``ar_scored_nll`` ± SE (the original AR model's NLL of them). A count the block layout or the
    sampler refuses is ``{"steps", "skipped": reason}``."""
    config = sweep_config(base, dlm)
    batches = math.ceil(len(prompt_ids) / batch_size)
    rows: list[dict[str, Any]] = []
    for s in steps:
        reason = allowed(config, s)
        if reason is not None:
            rows.append({"steps": int(s), "skipped": reason})
            continue
        at = dataclasses.replace(config, steps=int(s), threshold=None)
        a = diffusion_answers(dlm, tokenizer, prompt_ids, at, eos_id=eos_id, seed=seed, batch_size=batch_size)
        row: dict[str, Any] = {"steps": int(s), "nfe": a.nfe, "nfe_per_batch": a.nfe / batches}
        if refs is not None:
            row.update(quality(a, refs))
            row["bleu"] = bleu(a.texts, refs)
        row["seconds"] = a.seconds
        if ar_model is not None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
            sums, counts = ar_scored_nll(ar_model, prompt_ids, with_end(a, eos_id), pad_id=pad)
            row["ar_scored_nll"], row["ar_scored_nll_se"] = ratio_mean_se(sums, counts)
        rows.append(row)
    return rows


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
    """``steps_sweep`` at k tokens per step (``steps = gen_length // k``): per k its ``COMPUTE_KEYS``
    (exact match with ``refs``, AR-scored NLL with ``ar_model``, forward passes, seconds), or its
    ``skipped`` reason."""
    gen_length = sweep_config(base, dlm).gen_length
    ks = [int(k) for k in tokens_per_step]
    rows = steps_sweep(
        dlm,
        tokenizer,
        prompt_ids,
        base,
        [gen_length // k for k in ks],
        eos_id=eos_id,
        seed=seed,
        batch_size=batch_size,
        refs=refs,
        ar_model=ar_model,
    )
    out = []
    for k, row in zip(ks, rows):
        row = {"tokens_per_step": k, **row}
        out.append({key: row[key] for key in COMPUTE_KEYS if key in row})
    return out
