"""The Alpaca prompt template: a row {instruction, input, output} -> (prompt text, answer text).

The prompt is conditioning only (never noised, never supervised); the answer plus EOS is what the
model learns to produce.
"""

from __future__ import annotations

from collections.abc import Mapping

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
# The tiny task set uses a short template so its sequences stay short on CPU.
SHORT_WITH_INPUT = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"
SHORT_NO_INPUT = "### Instruction:\n{instruction}\n### Response:\n"

TEMPLATES = {
    "alpaca": (PROMPT_WITH_INPUT, PROMPT_NO_INPUT),
    "short": (SHORT_WITH_INPUT, SHORT_NO_INPUT),
}

REQUIRED_KEYS = ("instruction", "input", "output")


class MalformedRowError(ValueError):
    """A data row lacks a key or has a non-string field."""


def check_row(row: Mapping) -> None:
    """Raise ``MalformedRowError`` naming the problem if ``row`` is not an Alpaca row."""
    missing = [k for k in ("instruction", "output") if k not in row or row[k] is None]
    if missing:
        raise MalformedRowError(f"missing key(s) {missing}; an Alpaca row needs {list(REQUIRED_KEYS)}")
    for key in REQUIRED_KEYS:
        value = row.get(key, "")
        if value is not None and not isinstance(value, str):
            raise MalformedRowError(
                f"key {key!r} must be a string, got {type(value).__name__}: {value!r:.60}"
            )
    if not row["instruction"].strip():
        raise MalformedRowError("empty 'instruction'")


def render_prompt(row: Mapping, template: str = "alpaca") -> str:
    """The prompt text of a row (with the Input section only when ``input`` is non-empty)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    with_input, no_input = TEMPLATES[template]
    inp = (row.get("input") or "").strip()
    if inp:
        return with_input.format(instruction=row["instruction"].strip(), input=inp)
    return no_input.format(instruction=row["instruction"].strip())


def render(row: Mapping, template: str = "alpaca") -> tuple[str, str]:
    """(prompt, answer) texts of a row; the answer is the stripped ``output``."""
    check_row(row)
    return render_prompt(row, template), row["output"].strip()
