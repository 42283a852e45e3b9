"""Answers from a loaded diffusion model: the Python API behind ``diffllm.cli.generate`` and notebooks.

    model = load_for_inference(path)            # diffllm.inference.loading
    rows = generate_answers(model, ["Reverse these words: a b c"], sampler_overrides={"steps": 8})
    rows[0]["answer"], rows[0]["trajectory"]

Every instruction is rendered through the run's own prompt template (``data.template`` of the
checkpoint's config) and tokenised as in training (with the tokenizer's BOS). The sampler is the
checkpoint's ``sampler`` config with the given fields replaced (``SamplerConfig.with_overrides``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from diffllm.data.prompt_fit import PromptTooLongError, context_limit, fit_prompts
from diffllm.data.template import get_format
from diffllm.diffusion.sampler import generate
from diffllm.inference.inputs import InputError
from diffllm.inference.loading import InferenceModel
from diffllm.model.ar_generate import ar_generate


def generate_answers(
    model: InferenceModel,
    instructions: str | Sequence[str],
    inputs: Sequence[str | None] | None = None,
    sampler_overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    trajectory: bool = False,
    ar: bool = False,
    *,
    batch_size: int = 16,
    prompt_overflow: str = "error",
) -> list[dict[str, Any]]:
    """Answer every instruction with the diffusion sampler (and the original AR model if ``ar``).

    One dict per instruction, in order:

    * ``instruction``, ``input``, ``prompt`` (the rendered template text);
    * ``answer`` (decoded, special tokens skipped, stripped), ``answer_ids`` (up to the first EOS),
      ``canvas`` (all ``gen_length`` answer ids, EOS fill included), ``nfe`` (forward passes of the
      batch the row was decoded in), ``trajectory`` (a ``Trajectory`` if asked, else None);
    * with ``ar``: ``ar_answer``, ``ar_answer_ids``, ``ar_nfe`` from ``ar_generate`` (adapters
      off, causal attention, KV cache) with the same temperature / top-k / top-p and at most
      ``gen_length`` new tokens.

    Rows never interact in the sampler, so answers do not depend on ``batch_size``; ``seed`` seeds
    every row's generator (it matters only with temperature > 0). A prompt that leaves no room for
    the ``gen_length`` canvas within the model's positions is refused (``InputError``), or with
    ``prompt_overflow="truncate_left"`` cut from the left (``prompt_truncated`` is then True).
    """
    if isinstance(instructions, str):
        instructions = [instructions]
    if not instructions:
        raise InputError("no instruction given; pass at least one instruction string")
    if inputs is None:
        inputs = [""] * len(instructions)
    if len(inputs) != len(instructions):
        raise InputError(
            f"{len(inputs)} inputs for {len(instructions)} instructions; pass one input per instruction"
        )
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}; it must be >= 1")
    for i, text in enumerate(instructions):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"instruction {i} is {text!r}; every instruction must be a non-empty string")

    try:
        config = model.sampler_config.with_overrides(sampler_overrides)
    except ValueError as err:
        raise InputError(str(err)) from None
    tok = model.tokenizer
    fmt = get_format(model.template)
    rows = [{"instruction": t, "input": i or ""} for t, i in zip(instructions, inputs)]
    prompts = [fmt.prompt_text(r, tok) for r in rows]
    prompt_ids = [fmt.prompt_ids(r, tok) for r in rows]
    try:
        fitted, _ = fit_prompts(
            prompt_ids,
            config.gen_length,
            context_limit(model.dlm),
            prompt_overflow,
            bos_id=tok.bos_token_id,
            names=[f"instruction {i} ({t[:30]!r})" for i, t in enumerate(instructions)],
        )
    except PromptTooLongError as err:
        raise InputError(str(err)) from None
    cut = [len(a) != len(b) for a, b in zip(fitted, prompt_ids)]
    prompt_ids = fitted

    results: list[dict[str, Any]] = []
    for start in range(0, len(prompts), batch_size):
        ids = prompt_ids[start : start + batch_size]
        out = generate(
            model.dlm,
            ids,
            config,
            eos_id=model.eos_id,
            pad_id=tok.pad_token_id,
            seed=seed,
            record_trajectory=trajectory,
        )
        ar_out = None
        if ar:
            ar_out = ar_generate(
                model.dlm,
                ids,
                max_new_tokens=config.gen_length,
                eos_id=model.eos_id,
                pad_id=tok.pad_token_id,
                temperature=config.temperature,
                seed=seed,
                top_k=config.top_k,
                top_p=config.top_p,
            )
        for j, answer_ids in enumerate(out.tokens):
            k = start + j
            row: dict[str, Any] = {
                "instruction": instructions[k],
                "input": inputs[k] or "",
                "prompt": prompts[k],
                "prompt_truncated": cut[k],
                "answer": tok.decode(answer_ids, skip_special_tokens=True).strip(),
                "answer_ids": answer_ids,
                "canvas": out.canvas[j].tolist(),
                "nfe": out.nfe,
                "trajectory": out.trajectories[j] if out.trajectories is not None else None,
            }
            if ar_out is not None:
                row["ar_answer"] = tok.decode(ar_out.tokens[j], skip_special_tokens=True).strip()
                row["ar_answer_ids"] = ar_out.tokens[j]
                row["ar_nfe"] = ar_out.nfe
            results.append(row)
    return results
