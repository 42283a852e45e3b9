"""Answers from a trained diffusion model: the ``diffllm.cli.generate`` CLI and its Python API.

CLI (Hydra, ``conf/generate.yaml``; writes nothing unless asked)::

    python -m diffllm.generate ckpt_path=RUN/checkpoints/last.ckpt prompt="Reverse these words: a b c"
    python -m diffllm.generate ckpt_path=... prompts_file=prompts.jsonl sampler.threshold=0.9 sampler.cache=prefix
    python -m diffllm.generate ckpt_path=... prompt="..." ar=true trajectory=traj.json show_trajectory=true

The Python API it calls is ``diffllm.inference.generation.generate_answers`` (notebooks use it directly).
Every instruction is rendered through the run's own prompt template (``data.template`` of the
checkpoint's config) and tokenised as in training (with the tokenizer's BOS). The sampler is the
checkpoint's ``sampler`` config with the given fields replaced. Bad input (no checkpoint, an
unreadable or malformed prompts file, inconsistent sampler settings) is reported in one line that
names the value and the fix, with exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from diffllm.cli.support import is_set, set_keys
from diffllm.config.resolvers import hydra_main
from diffllm.config.schema import ConfigError, check_positive, check_sampler_overrides
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.diffusion.trajectory import trajectories_to_json
from diffllm.evaluation.metrics import normalise
from diffllm.inference.generation import generate_answers
from diffllm.inference.inputs import EXIT_BAD_INPUT, InputError, check_device
from diffllm.inference.loading import load_quietly

LABEL_WIDTH = 12  # "instruction:" and the answers under it start in the same column


@dataclasses.dataclass(frozen=True)
class PromptRow:
    """One request: an Alpaca instruction, its optional input, and a reference answer if known."""

    instruction: str
    input: str = ""
    reference: str | None = None


# -- input ---------------------------------------------------------------------------------------
def read_prompts_file(path: str | Path) -> list[PromptRow]:
    """Prompts from a text file: one instruction per line, or JSONL rows with Alpaca keys.

    The file is JSONL when it ends in ``.jsonl`` or its first non-blank line starts with ``{``;
    then every non-blank line must be an object with a non-empty string ``instruction`` (``input``
    and ``output`` optional; ``output`` becomes the reference). Blank lines are skipped.
    """
    path = Path(path)
    hint = "pass a UTF-8 text file with one instruction per line, or JSONL with an 'instruction' key"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"prompts_file={str(path)!r} does not exist; {hint}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"prompts_file={str(path)!r} cannot be read ({err}); {hint}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise InputError(f"prompts_file={str(path)!r} has no prompt (empty or blank lines only); {hint}")
    if path.suffix != ".jsonl" and not lines[0][1].lstrip().startswith("{"):
        return [PromptRow(line.strip()) for _, line in lines]
    return [_jsonl_row(line, n, path) for n, line in lines]


def _jsonl_row(line: str, number: int, path: Path) -> PromptRow:
    where = f"prompts_file={str(path)!r} line {number}"
    fix = 'every line of a JSONL prompts file must be an object like {"instruction": "...", "input": "..."}'
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where} is not valid JSON ({err.msg} at column {err.colno}); {fix}") from None
    if not isinstance(row, dict):
        raise InputError(f"{where} is a JSON {type(row).__name__}, not an object; {fix}")
    values = {}
    for key in ("instruction", "input", "output"):
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise InputError(
                f"{where}: {key!r} must be a string, got {type(value).__name__} {value!r:.40}; {fix}"
            )
        values[key] = value
    if not (values["instruction"] or "").strip():
        raise InputError(f"{where} has no (or an empty) 'instruction'; {fix}")
    return PromptRow(values["instruction"].strip(), (values["input"] or "").strip(), values["output"])


# -- output --------------------------------------------------------------------------------------
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
    lines = [f"# sampler: {_describe(config)}"] if config is not None else []
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


# -- the CLI -------------------------------------------------------------------------------------
def _requests(cfg: DictConfig) -> list[PromptRow]:
    has_prompt, has_file = is_set(cfg, "prompt"), is_set(cfg, "prompts_file")
    if has_prompt and has_file:
        raise InputError(f"both prompt=... and prompts_file={cfg.prompts_file!r} given; pass one of them")
    if has_file:
        if is_set(cfg, "input"):
            raise InputError(
                "input=... goes with prompt=...; in a prompts_file use JSONL rows with an 'input' key"
            )
        return read_prompts_file(str(cfg.prompts_file))
    if not has_prompt or not str(cfg.prompt).strip():
        raise InputError(
            'no prompt; pass prompt="an instruction" or prompts_file=path (one per line, or JSONL)'
        )
    return [PromptRow(str(cfg.prompt).strip(), str(cfg.input).strip() if is_set(cfg, "input") else "")]


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """The CLI body: check the input, load the model, generate, print, write the trajectory file."""
    if not is_set(cfg, "ckpt_path"):
        raise InputError(
            "ckpt_path is missing; pass ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt "
            "(printed as 'checkpoint:' at the end of `make train`) or an exported folder"
        )
    ckpt = Path(str(cfg.ckpt_path))
    if not ckpt.exists():
        raise InputError(
            f"ckpt_path={str(ckpt)!r} does not exist; pass a .ckpt from a run folder "
            "(outputs/<date>/<time>/checkpoints/last.ckpt) or a folder written by diffllm.export"
        )
    requests = _requests(cfg)
    overrides = set_keys(cfg.get("sampler"))
    try:  # the command line against the schema, before anything is read
        check_positive({"batch_size": cfg.batch_size})
        check_sampler_overrides(overrides)
    except ConfigError as err:
        raise InputError(str(err)) from None
    check_device(str(cfg.device))

    try:
        model = load_quietly(
            ckpt, str(cfg.device), trust_remote_code=bool(cfg.get("trust_remote_code", False))
        )
    except ConfigError as err:  # a file refused as data (diffllm.config.trust.check_untrusted)
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

    record = bool(cfg.trajectory) or bool(cfg.show_trajectory)
    results = generate_answers(
        model,
        [r.instruction for r in requests],
        [r.input for r in requests],
        sampler_overrides=overrides,
        seed=int(cfg.seed),
        trajectory=record,
        ar=bool(cfg.ar),
        batch_size=int(cfg.batch_size),
        prompt_overflow=str(cfg.prompt_overflow),
    )
    references = [r.reference for r in requests]
    width = shutil.get_terminal_size((160, 24)).columns
    print(format_results(results, model.tokenizer, bool(cfg.show_trajectory), width, references))
    print("\n".join(summary_lines(results, references, int(cfg.batch_size), config)))
    if cfg.trajectory:
        _write_trajectories(Path(str(cfg.trajectory)), [r["trajectory"] for r in results])
    return results


def _describe(config: SamplerConfig) -> str:
    return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items())


def _write_trajectories(path: Path, trajectories: list) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(trajectories_to_json(trajectories))
    except OSError as err:
        raise InputError(
            f"trajectory={str(path)!r} cannot be written ({err}); pass a writable path"
        ) from None
    print(f"# trajectories: {path}", flush=True)


@hydra_main("generate", exit_code=EXIT_BAD_INPUT)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
