"""Answers from a loaded diffusion model: the Python API behind ``diffllm.cli.generate`` and notebooks.

    model = load_for_inference(path)            # diffllm.inference.loading
    rows = generate_answers(model, ["Reverse these words: a b c"], sampler_overrides={"steps": 8})
    rows[0]["answer"], rows[0]["trajectory"]

Every instruction is rendered through the run's own prompt template (``data.template`` of the
checkpoint's config) and tokenised as in training (with the tokenizer's BOS). The sampler is the
checkpoint's ``sampler`` config with the given fields replaced (``SamplerConfig.with_overrides``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from diffllm.config.schema import ConfigError, check_positive, check_sampler_overrides
from diffllm.data.prompt_fit import PromptTooLongError, context_limit, fit_prompts
from diffllm.data.template import get_format
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.diffusion.trajectory import StepFrame, trajectories_to_json
from diffllm.evaluation.metrics import normalise
from diffllm.evaluation.scoring import ar_answers, diffusion_answers
from diffllm.inference.inputs import InputError, PromptRow, check_device
from diffllm.inference.live import LiveTerminal
from diffllm.inference.loading import InferenceModel, ar_baseline_model, load_quietly

LABEL_WIDTH = 12  # "instruction:" and the answers under it start in the same column


def speculative_verifier(model: InferenceModel, config: Any) -> Any:
    """The AR base that verifies ``sampler.mode=speculative verifier=base`` drafts of a model without
    adapters to switch off (an exported merged folder): rebuilt from the recorded ``model.pretrained``.
    None when there is nothing to load (another mode, or the model's own adapters can be switched off)."""
    if config.mode != "speculative" or config.verifier != "base":
        return None
    device = next(model.dlm.parameters()).device
    base = ar_baseline_model(model, device)
    if base is None:
        raise InputError(
            f"sampler.mode=speculative with verifier=base needs the AR base beside {model.source}, which records "
            "none that loads (model.pretrained); use sampler.verifier=self or the denoising sampler"
        )
    return None if base is model.dlm else base


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
    on_step: Callable[[StepFrame], None] | None = None,
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

    Both go through the one batch-and-decode loop (``scoring.decode_answers``).

    Rows never interact in the sampler, so answers do not depend on ``batch_size``; ``seed`` seeds
    every row's generator (it matters only with temperature > 0). A prompt that leaves no room for
    the ``gen_length`` canvas within the model's positions is refused (``InputError``), or with
    ``prompt_overflow="truncate_left"`` cut from the left (``prompt_truncated`` is then True).
    ``on_step`` (a live view) gets the sampler's frames of every batch (``sampler.generate``), each
    with its ``first_row`` among ``instructions``.
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

    verifier = speculative_verifier(model, config)
    diffusion = diffusion_answers(
        model.dlm,
        tok,
        prompt_ids,
        config,
        eos_id=model.eos_id,
        seed=seed,
        batch_size=batch_size,
        trajectory=trajectory,
        on_step=on_step,
        verifier=verifier,
    )
    ar_out = None
    if ar:
        ar_out = ar_answers(
            model.dlm,
            tok,
            prompt_ids,
            config.gen_length,
            eos_id=model.eos_id,
            batch_size=batch_size,
            temperature=config.temperature,
            seed=seed,
            top_k=config.top_k,
            top_p=config.top_p,
        )
    results: list[dict[str, Any]] = []
    for k in range(len(prompts)):
        row: dict[str, Any] = {
            "instruction": instructions[k],
            "input": inputs[k] or "",
            "prompt": prompts[k],
            "prompt_truncated": cut[k],
            "answer": diffusion.texts[k],
            "answer_ids": diffusion.tokens[k],
            "canvas": diffusion.canvas[k],
            "nfe": diffusion.batch_nfe[k],
            "trajectory": diffusion.trajectories[k] if diffusion.trajectories is not None else None,
        }
        if ar_out is not None:
            row["ar_answer"] = ar_out.texts[k]
            row["ar_answer_ids"] = ar_out.tokens[k]
            row["ar_nfe"] = ar_out.batch_nfe[k]
        results.append(row)
    return results


def load_checked(
    ckpt_path: str | Path | None,
    sampler: Mapping[str, Any] | None = None,
    *,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[InferenceModel, SamplerConfig]:
    """A checkpoint or exported folder loaded for answering (the generate command line and the app):
    the sampler overrides checked against the schema before anything is read, then the model, then
    its sampler config with ``sampler`` applied. Returns (the model, that config); bad input of any
    kind is one ``InputError`` line."""
    if ckpt_path is None:
        raise InputError(
            "ckpt_path is missing; pass ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt "
            "(printed as 'checkpoint:' at the end of `make train`) or an exported folder"
        )
    ckpt = Path(str(ckpt_path))
    if not ckpt.exists():
        raise InputError(
            f"ckpt_path={str(ckpt)!r} does not exist; pass a .ckpt from a run folder "
            "(outputs/<date>/<time>/checkpoints/last.ckpt) or a folder written by diffllm.export"
        )
    overrides = dict(sampler or {})
    try:  # the command line against the schema, before anything is read
        check_sampler_overrides(overrides)
    except ConfigError as err:
        raise InputError(str(err)) from None
    check_device(str(device))
    try:
        model = load_quietly(ckpt, str(device), trust_remote_code=trust_remote_code)
    except ConfigError as err:  # a file refused as data (diffllm.config.schema.check_untrusted)
        raise InputError(str(err)) from None
    except Exception as err:  # an unreadable / foreign file is bad input, not a crash
        raise InputError(
            f"ckpt_path={str(ckpt)!r} could not be loaded ({type(err).__name__}: {err}); "
            "pass a .ckpt written by diffllm.train or a folder written by diffllm.export"
        ) from None
    try:
        config = model.sampler_config.with_overrides(overrides)  # fail before any work
    except ValueError as err:
        raise InputError(str(err)) from None
    return model, config


def generate_from_checkpoint(
    ckpt_path: str | Path | None,
    requests: Sequence[PromptRow],
    *,
    sampler: Mapping[str, Any] | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    seed: int = 0,
    trajectory: bool = False,
    ar: bool = False,
    batch_size: int = 16,
    prompt_overflow: str = "error",
    live: bool = False,
    live_delay: float = 0.0,
) -> tuple[InferenceModel, SamplerConfig, list[dict[str, Any]]]:
    """``python -m diffllm.generate``'s library call: check the arguments (before anything loads), load
    the checkpoint or exported folder, answer every request (``generate_answers``). Returns (the
    model, the sampler config used, the rows). Bad input of any kind is one ``InputError`` line.
    ``live``: every answer's canvas redrawn in the terminal at every step (``live.LiveTerminal``),
    ``live_delay`` seconds after each."""
    if live_delay < 0:
        raise InputError(f"live_delay={live_delay}; pass seconds >= 0")
    try:
        check_positive({"batch_size": batch_size})
    except ConfigError as err:
        raise InputError(str(err)) from None
    model, config = load_checked(ckpt_path, sampler, device=device, trust_remote_code=trust_remote_code)
    view = None
    if live:
        labels = [f"{i + 1}/{len(requests)} {r.instruction[:70]}" for i, r in enumerate(requests)]
        view = LiveTerminal(model, config, labels, delay=live_delay)
    with view or contextlib.nullcontext():
        results = generate_answers(
            model,
            [r.instruction for r in requests],
            [r.input for r in requests],
            sampler_overrides=dict(sampler or {}),
            seed=seed,
            trajectory=trajectory,
            ar=ar,
            batch_size=batch_size,
            prompt_overflow=prompt_overflow,
            on_step=None if view is None else view.on_step,
        )
    return model, config, results


# ----------------------------------------------------------------------------------- the terminal view


def _field(label: str, text: str) -> str:
    """``label:`` padded to LABEL_WIDTH, then ``text``; later lines of ``text`` indented under it."""
    pad = " " * (LABEL_WIDTH + 1)
    head, *rest = (text or "").split("\n")
    return "\n".join([f"{label + ':':<{LABEL_WIDTH}} {head}".rstrip()] + [pad + line for line in rest])


def format_results(
    results: Sequence[Mapping[str, Any]],
    tokenizer: Any = None,
    show_trajectory: bool = False,
    width: int | None = None,
    references: Sequence[str | None] | None = None,
) -> str:
    """The terminal view: per prompt its instruction, the diffusion answer and (if run) the AR one
    right under it, the reference when known, and optionally the denoising trajectory."""
    out = []
    n = len(results)
    for i, r in enumerate(results):
        out.append(f"=== {i + 1}/{n} ===")
        out.append(_field("instruction", r["instruction"]))
        if r.get("input"):
            out.append(_field("input", r["input"]))
        out.append(_field("diffusion", r["answer"]))
        if "ar_answer" in r:
            out.append(_field("ar", r["ar_answer"]))
        if references is not None and references[i] is not None:
            out.append(_field("reference", references[i].strip()))
        if show_trajectory and r.get("trajectory") is not None:
            out.append(r["trajectory"].render(tokenizer, width=width))
    return "\n".join(out)


def summary_lines(
    results: Sequence[Mapping[str, Any]],
    references: Sequence[str | None] | None,
    batch_size: int,
    config: SamplerConfig | None = None,
) -> list[str]:
    """The sampler settings, forward passes summed over the batches and, where references exist,
    the exact-match counts."""
    lines = (
        [f"# sampler: {' '.join(f'{k}={v}' for k, v in dataclasses.asdict(config).items())}"]
        if config
        else []
    )
    firsts = results[::batch_size]  # the rows of one batch share its nfe: count each batch once
    line = f"# forward passes: diffusion {sum(r['nfe'] for r in firsts)}"
    if firsts and "ar_nfe" in firsts[0]:
        line += f", ar {sum(r['ar_nfe'] for r in firsts)}"
    lines.append(line + f" ({len(firsts)} batch{'es' if len(firsts) > 1 else ''} of <= {batch_size})")
    scored = [(r, ref) for r, ref in zip(results, references or []) if ref is not None]
    if scored:

        def hits(key: str) -> str:
            return f"{sum(normalise(r[key]) == normalise(ref) for r, ref in scored)}/{len(scored)}"

        line = f"# exact match vs reference: diffusion {hits('answer')}"
        lines.append(line + (f", ar {hits('ar_answer')}" if "ar_answer" in scored[0][0] else ""))
    return lines


def write_trajectories(path: str | Path, results: Sequence[Mapping[str, Any]]) -> Path:
    """Every row's trajectory as JSON (``diffusion.trajectory``); an unwritable path is ``InputError``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(trajectories_to_json([r["trajectory"] for r in results]))
    except OSError as err:
        raise InputError(
            f"trajectory={str(path)!r} cannot be written ({err}); pass a writable path"
        ) from None
    return path
