"""Bad user input at inference time: the error a command line turns into exit code 2, the device
check every entry point runs before loading, and the requests of ``generate`` (a prompt or a
prompts file) read and checked."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """Bad user input; a CLI prints the message (no traceback) and exits with ``EXIT_BAD_INPUT``."""


def check_device(device: str) -> None:
    """Refuse a device string torch does not know, or CUDA where there is none."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={device!r} but CUDA is not available here; pass device=cpu")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device={device!r} is not a torch device; pass device=cpu or device=cuda") from None


@dataclasses.dataclass(frozen=True)
class PromptRow:
    """One request: an Alpaca instruction, its optional input, and a reference answer if known."""

    instruction: str
    input: str = ""
    reference: str | None = None


def read_requests(prompt: str | None, input: str | None, prompts_file: str | None) -> list[PromptRow]:
    """The requests of one ``generate`` call: ``prompt`` (with its ``input``) or every row of
    ``prompts_file``; None means not given. Exactly one of the two, or ``InputError``."""
    if prompt is not None and prompts_file is not None:
        raise InputError(f"both prompt=... and prompts_file={prompts_file!r} given; pass one of them")
    if prompts_file is not None:
        if input is not None:
            raise InputError(
                "input=... goes with prompt=...; in a prompts_file use JSONL rows with an 'input' key"
            )
        return read_prompts_file(prompts_file)
    if prompt is None or not str(prompt).strip():
        raise InputError(
            'no prompt; pass prompt="an instruction" or prompts_file=path (one per line, or JSONL)'
        )
    return [PromptRow(str(prompt).strip(), str(input).strip() if input is not None else "")]


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
