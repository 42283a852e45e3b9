"""Generation input that fits the model: prompt + answer canvas within the model's positions.

A prompt of ``p`` tokens and a canvas of ``gen_length`` positions need ``p + gen_length`` positions;
past the model's ``max_position_embeddings`` a rotary model still runs, and writes garbage. Every
caller that generates (``diffllm.cli.generate``, ``diffllm.cli.evaluate``, the end-of-run report) passes its
prompt ids through ``fit_prompts`` first:

    overflow="error"          refuse, in one line naming the prompt, its length and the limit
    overflow="truncate_left"  keep the prompt's last tokens (after its BOS, if it starts with one),
                              log a warning with the count, and return the count
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

PROMPT_OVERFLOW = ("error", "truncate_left")


class PromptTooLongError(ValueError):
    """A prompt does not fit the model's context with the answer canvas; the message names the fix."""


def context_limit(model: Any) -> int | None:
    """The model's number of positions (``max_position_embeddings`` of its Hugging Face config),
    looked up through wrappers (``DiffusionLM.model``, PEFT's ``base_model``); None if it has none."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int):
            return limit
        model = getattr(model, "model", None) or getattr(model, "base_model", None)
    return None


def fit_prompts(
    prompt_ids: Sequence[Sequence[int]],
    gen_length: int,
    limit: int | None,
    overflow: str = "error",
    *,
    key: str = "prompt_overflow",
    bos_id: int | None = None,
    names: Sequence[str] | None = None,
) -> tuple[list[list[int]], int]:
    """(prompt ids that fit ``limit - gen_length`` positions, how many prompts were cut).

    ``limit=None`` (a model without a position limit) keeps every prompt. ``names[i]`` says which
    prompt ``i`` is in messages (default ``prompt i``); ``key`` is the option the caller exposes.
    """
    if overflow not in PROMPT_OVERFLOW:
        raise PromptTooLongError(f"{key}={overflow!r} is not one of {list(PROMPT_OVERFLOW)}")
    prompts = [list(p) for p in prompt_ids]
    if limit is None:
        return prompts, 0
    room = limit - gen_length
    if room < 2:
        raise PromptTooLongError(
            f"sampler.gen_length={gen_length} leaves {max(room, 0)} of the model's {limit} positions for "
            f"the prompt; lower sampler.gen_length to at most {limit - 2}"
        )
    over = [i for i, p in enumerate(prompts) if len(p) > room]
    if not over:
        return prompts, 0
    first = over[0]
    name = names[first] if names is not None else f"prompt {first}"
    if overflow == "error":
        raise PromptTooLongError(
            f"{name} is {len(prompts[first])} tokens, and with sampler.gen_length={gen_length} the model's "
            f"{limit} positions leave room for {room} ({len(over)} of {len(prompts)} prompts are longer); "
            f"shorten it, lower sampler.gen_length, or pass {key}=truncate_left to keep its last tokens"
        )
    for i in over:
        p = prompts[i]
        head = p[:1] if bos_id is not None and p and p[0] == bos_id else []
        prompts[i] = head + p[len(p) - (room - len(head)) :]
    log.warning(
        "%d of %d prompts longer than the %d positions that the model's %d leave beside "
        "sampler.gen_length=%d: truncated from the left (%s=truncate_left), first: %s",
        len(over),
        len(prompts),
        room,
        limit,
        gen_length,
        key,
        name,
    )
    return prompts, len(over)


def fit_prompt_rows(
    prompts: Sequence[dict[str, Any]],
    gen_length: int,
    model: Any,
    overflow: str = "error",
    *,
    key: str = "prompt_overflow",
    bos_id: int | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """``fit_prompts`` on rows of ``datamodule.sample_prompts`` (their ``prompt_ids``), for the
    model's own position limit: (rows with the ids that fit, how many were cut)."""
    ids, cut = fit_prompts(
        [p["prompt_ids"] for p in prompts],
        gen_length,
        context_limit(model),
        overflow,
        key=key,
        bos_id=bos_id,
        names=[f"validation row {i}" for i in range(len(prompts))],
    )
    return [{**p, "prompt_ids": i} for p, i in zip(prompts, ids)], cut
