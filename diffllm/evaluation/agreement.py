"""What a fine-tune keeps of its base model: its greedy answers against the base model's, prompt by prompt.

On prompts none of the models trained on (the 100 real Alpaca instructions shipped as
``diffllm.assets.ALPACA_SAMPLE``), each model's answers are compared with the base model's greedy
answers (adapters off, causal attention), all capped at the same ``gen_length``:

- **exact match**: the two answer texts are equal after whitespace normalisation
  (``metrics.normalise``), ± its binomial SE;
- **first difference**: the number of leading answer tokens the two answers share, i.e. the
  0-based position of the first token where they differ. When one answer is a prefix of the other
  it is the shorter one's length (there one ended and the other went on); for equal answers it is
  their length. Its mean ± SE over prompts. Higher is closer to the base.

The converted model's answers are the sampler's (greedy when ``sampler.temperature`` is 0), AR-SFT's
its greedy answers with the adapters on. ``<a>_minus_<b>`` rows are differences paired over the
prompts (exact match and first difference), with their SEs. The table is ``tables.agreement_table``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffllm.data.prompt_fit import fit_prompt_rows
from diffllm.data.reader import describe, parse_file
from diffllm.data.template import PromptFormat
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.evaluation.metrics import normalise
from diffllm.evaluation.scoring import Answers, ar_answers, binomial_se, diffusion_answers, mean_se
from diffllm.model.dlm import DiffusionLM

BASE = "ar_base"  # the answers' key of the base model (``names.MODELS``, as in ``compare``)
EXAMPLES = 3  # prompts shown with every model's answer

log = logging.getLogger(__name__)


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading tokens ``a`` and ``b`` share (``len(a)`` when they are equal)."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def row_agreement(
    texts: Sequence[str],
    tokens: Sequence[Sequence[int]],
    base_texts: Sequence[str],
    base_tokens: Sequence[Sequence[int]],
) -> tuple[list[float], list[int]]:
    """Per prompt: (exact match 1.0 / 0.0 after whitespace normalisation, first-difference position)."""
    if not len(texts) == len(tokens) == len(base_texts) == len(base_tokens):
        raise ValueError(
            f"answers of different lengths: {len(texts)} texts, {len(tokens)} token lists vs the base's "
            f"{len(base_texts)} and {len(base_tokens)}"
        )
    matches = [float(normalise(t) == normalise(b)) for t, b in zip(texts, base_texts)]
    return matches, [first_difference(a, b) for a, b in zip(tokens, base_tokens)]


def agreement(answers: Answers, base: Answers) -> dict[str, float]:
    """Exact match with the base's answers and the mean first-difference position, each ± SE."""
    if answers.tokens is None or base.tokens is None:
        raise ValueError("agreement needs the answers' token ids (Answers.tokens)")
    matches, positions = row_agreement(answers.texts, answers.tokens, base.texts, base.tokens)
    em = sum(matches) / len(matches) if matches else float("nan")
    first, first_se = mean_se(positions)
    length, length_se = mean_se([len(t) for t in answers.tokens])
    return {
        "rows": len(matches),
        "exact_match": em,
        "exact_match_se": binomial_se(em, len(matches)),
        "first_difference": first,
        "first_difference_se": first_se,
        "answer_length": length,
        "answer_length_se": length_se,
    }


def paired_agreement(a: Answers, b: Answers, base: Answers) -> dict[str, float]:
    """``a``'s agreement with the base minus ``b``'s, paired over the prompts, with the SEs."""
    match_a, first_a = row_agreement(a.texts, a.tokens, base.texts, base.tokens)
    match_b, first_b = row_agreement(b.texts, b.tokens, base.texts, base.tokens)
    em, em_se = mean_se([x - y for x, y in zip(match_a, match_b)])
    first, first_se = mean_se([x - y for x, y in zip(first_a, first_b)])
    return {
        "exact_match": em,
        "exact_match_se": em_se,
        "first_difference": first,
        "first_difference_se": first_se,
    }


def agreement_table(answers: Mapping[str, Answers], base: str = BASE) -> dict[str, Any]:
    """Every model's agreement with ``answers[base]``, and ``diffusion_minus_ar_sft`` when both are there."""
    if base not in answers:
        raise ValueError(f"no answers of the base model ({base!r}) among {sorted(answers)}")
    out: dict[str, Any] = {
        "models": {k: agreement(a, answers[base]) for k, a in answers.items() if k != base},
        "base_answer_length": mean_se([len(t) for t in answers[base].tokens or []])[0],
    }
    if "diffusion" in answers and "ar_sft" in answers:
        out["diffusion_minus_ar_sft"] = paired_agreement(
            answers["diffusion"], answers["ar_sft"], answers[base]
        )
    return out


def agreement_answers(
    prompt_ids: Sequence[list[int]],
    *,
    tokenizer: Any,
    eos_id: int,
    config: SamplerConfig,
    seed: int,
    batch_size: int,
    base: DiffusionLM,
    diffusion: DiffusionLM | None = None,
    ar_sft: DiffusionLM | None = None,
) -> dict[str, Answers]:
    """The answers ``agreement_table`` compares, at most ``config.gen_length`` tokens each: the
    sampler's (``diffusion``), AR-SFT's greedy (adapters on), the base's greedy (``base``'s adapters
    off, causal attention)."""
    out: dict[str, Answers] = {}
    if diffusion is not None:
        out["diffusion"] = diffusion_answers(
            diffusion, tokenizer, prompt_ids, config, eos_id=eos_id, seed=seed, batch_size=batch_size
        )
    if ar_sft is not None:
        out["ar_sft"] = ar_answers(
            ar_sft,
            tokenizer,
            prompt_ids,
            config.gen_length,
            eos_id=eos_id,
            batch_size=batch_size,
            adapters=True,
        )
    out[BASE] = ar_answers(
        base, tokenizer, prompt_ids, config.gen_length, eos_id=eos_id, batch_size=batch_size
    )
    return out


def agreement_on_file(
    path: str | Path,
    *,
    prompt_format: PromptFormat,
    tokenizer: Any,
    eos_id: int,
    config: SamplerConfig,
    seed: int,
    batch_size: int,
    base: DiffusionLM,
    diffusion: DiffusionLM | None = None,
    ar_sft: DiffusionLM | None = None,
    prompt_overflow: str = "error",
) -> dict[str, Any]:
    """``agreement_table`` on the Alpaca rows of ``path`` (a .json / .jsonl file), rendered through
    ``prompt_format`` (the run's ``data.template``); prompts longer than the model's positions minus
    ``gen_length`` are cut or refused by ``prompt_overflow`` (``diffllm.data.prompt_fit``)."""
    rows, rejected = parse_file(path)
    if rejected:
        log.warning("agreement_file=%s: %d row(s) skipped: %s", path, len(rejected), describe(rejected))
    if not rows:
        raise ValueError(
            f"agreement_file={str(path)!r} holds no usable Alpaca row; pass a .json/.jsonl file of them"
        )
    prompts = [{"prompt_ids": prompt_format.prompt_ids(r, tokenizer), "row": r} for r in rows]
    prompts, cut = fit_prompt_rows(
        prompts,
        config.gen_length,
        base,
        prompt_overflow,
        key="prompt_overflow",
        bos_id=tokenizer.bos_token_id,
    )
    answers = agreement_answers(
        [p["prompt_ids"] for p in prompts],
        tokenizer=tokenizer,
        eos_id=eos_id,
        config=config,
        seed=seed,
        batch_size=batch_size,
        base=base,
        diffusion=diffusion,
        ar_sft=ar_sft,
    )
    examples = [
        {"instruction": p["row"]["instruction"], "input": p["row"].get("input") or ""}
        | {k: a.texts[i] for k, a in answers.items()}
        for i, p in enumerate(prompts[:EXAMPLES])
    ]
    return {
        "file": str(path),
        "rows": len(prompts),
        "rows_skipped": len(rejected),
        "prompts_truncated": cut,
        "gen_length": config.gen_length,
        **agreement_table(answers),
        "examples": examples,
    }
