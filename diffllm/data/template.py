"""Prompt formats: a row {instruction, input, output} -> prompt token ids, answer text, end-of-answer id.

``data.template`` names a format or gives one as a format string:

    alpaca   the Alpaca header ("Below is an instruction ... ### Response:\\n")
    short    the tiny task set's short header ("### Instruction:\\n...### Response:\\n")
    raw      the instruction (a newline and the input when there is one) and a newline: no added
             words, for base models and plain corpora
    chat     the tokenizer's own chat template (``apply_chat_template``): user turn = instruction
             (+ blank line + input), assistant turn = the answer, which ends with the template's
             end-of-turn token (``<|im_end|>`` for SmolLM2), not a hard-coded EOS
    "...{instruction}...{input}..."   any format string with an ``{instruction}`` field (and
             optionally ``{input}``, empty when the row has none)

The prompt is conditioning only (never noised, never supervised); the answer plus its end token is
what the model learns to produce. ``end_of_answer_id(tokenizer, template)`` is the one place that
says which token ends an answer: the datamodule (answer end and EOS padding), the sampler's EOS
handling, AR generation and the export card all read it.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

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
RAW_WITH_INPUT = "{instruction}\n{input}\n"
RAW_NO_INPUT = "{instruction}\n"

# Text formats by name: (with input, without input).
TEMPLATES = {
    "alpaca": (PROMPT_WITH_INPUT, PROMPT_NO_INPUT),
    "short": (SHORT_WITH_INPUT, SHORT_NO_INPUT),
    "raw": (RAW_WITH_INPUT, RAW_NO_INPUT),
}
CHAT = "chat"
FORMAT_FIELDS = ("instruction", "input")

REQUIRED_KEYS = ("instruction", "input", "output")


class MalformedRowError(ValueError):
    """A data row lacks a key or has a non-string field."""


class TemplateError(ValueError):
    """``data.template`` names no format, or the tokenizer cannot render it."""


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


def _fields(row: Mapping) -> tuple[str, str]:
    return row["instruction"].strip(), (row.get("input") or "").strip()


@dataclass(frozen=True)
class TextFormat:
    """A plain-text prompt; the tokenizer adds its own special tokens (BOS); the answer ends with EOS."""

    name: str
    with_input: str
    no_input: str
    add_special_tokens: ClassVar[bool] = True  # the tokenizer's BOS before the prompt

    def prompt_text(self, row: Mapping, tokenizer: Any = None) -> str:
        instruction, inp = _fields(row)
        if inp:
            return self.with_input.format(instruction=instruction, input=inp)
        return self.no_input.format(instruction=instruction, input="")

    def prompt_ids(self, row: Mapping, tokenizer: Any) -> list[int]:
        return tokenizer(self.prompt_text(row), add_special_tokens=self.add_special_tokens)["input_ids"]

    def end_id(self, tokenizer: Any) -> int:
        if tokenizer.eos_token_id is None:
            raise TemplateError(f"template {self.name!r} ends answers with EOS, but the tokenizer has none")
        return int(tokenizer.eos_token_id)

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "with_input": self.with_input, "no_input": self.no_input}


_SENTINEL = "\u2063diffllm-answer\u2063"  # an answer text no template changes


@dataclass(frozen=True)
class ChatFormat:
    """The tokenizer's chat template: user turn = instruction (+ input), assistant turn = the answer.

    The prompt is the conversation up to the assistant's generation prompt, tokenised without
    added special tokens (the template writes any BOS it wants). The end-of-answer token is the
    first token the template writes after the assistant's content (its end-of-turn token).
    """

    name: str = CHAT
    add_special_tokens: ClassVar[bool] = False  # the template writes any BOS it wants

    @staticmethod
    def _check(tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"data.template=chat needs a tokenizer with a chat template, and {type(tokenizer).__name__} "
                f"({getattr(tokenizer, 'name_or_path', '')!r}) has none. Fix: use an instruct model's "
                "tokenizer, set tokenizer.chat_template, or pick data.template=raw / short / alpaca / a "
                "format string with {instruction}"
            )

    @staticmethod
    def _messages(row: Mapping) -> list[dict[str, str]]:
        instruction, inp = _fields(row)
        return [{"role": "user", "content": f"{instruction}\n\n{inp}" if inp else instruction}]

    def prompt_text(self, row: Mapping, tokenizer: Any) -> str:
        self._check(tokenizer)
        return tokenizer.apply_chat_template(self._messages(row), add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, row: Mapping, tokenizer: Any) -> list[int]:
        return tokenizer(self.prompt_text(row, tokenizer), add_special_tokens=self.add_special_tokens)[
            "input_ids"
        ]

    def end_id(self, tokenizer: Any) -> int:
        self._check(tokenizer)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
        if _SENTINEL not in text:
            raise TemplateError(
                "the tokenizer's chat template drops the assistant's content; use another template"
            )
        after = tokenizer(text.split(_SENTINEL, 1)[1], add_special_tokens=False)["input_ids"]
        if not after:
            raise TemplateError(
                "the tokenizer's chat template writes nothing after the assistant's answer, so it has no "
                "end-of-turn token; pick data.template=raw or a format string (answers then end with EOS)"
            )
        return int(after[0])

    def describe(self) -> dict[str, str]:
        return {"name": self.name}


PromptFormat = TextFormat | ChatFormat


def get_format(template: str) -> PromptFormat:
    """The prompt format ``data.template`` names (or spells out as a format string)."""
    if template == CHAT:
        return ChatFormat()
    if template in TEMPLATES:
        return TextFormat(template, *TEMPLATES[template])
    if isinstance(template, str) and "{instruction}" in template:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        unknown = fields - set(FORMAT_FIELDS)
        if unknown:
            raise TemplateError(
                f"data.template={template!r} has field(s) {sorted(unknown)}; a format string may use "
                f"{{instruction}} and {{input}} only"
            )
        return TextFormat("format", template, template)
    raise TemplateError(
        f"unknown data.template={template!r}; choose one of {sorted([*TEMPLATES, CHAT])} or give a format "
        "string with an {instruction} field (and optionally {input})"
    )


def end_of_answer_id(tokenizer: Any, template: str) -> int:
    """The token id that ends an answer under ``template`` (EOS, or the chat template's end of turn)."""
    return get_format(template).end_id(tokenizer)


def render_prompt(row: Mapping, template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text of a row (a text format's Input section only when ``input`` is non-empty)."""
    return get_format(template).prompt_text(row, tokenizer)


def render(row: Mapping, template: str = "alpaca", tokenizer: Any = None) -> tuple[str, str]:
    """(prompt, answer) texts of a row; the answer is the stripped ``output``."""
    check_row(row)
    return render_prompt(row, template, tokenizer), row["output"].strip()
