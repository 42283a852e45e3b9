"""Documents of the project's harness tasks, built from the embedded tiny validation split.

``diffllm_tiny_mc`` (multiple choice): the prompt of a tiny task row (``short`` template) and four
answers: the row's own and the outputs of the next three rows of the same task (file order,
cyclic, distinct); the gold answer stands at position ``i % 4`` of doc ``i``. ``diffllm_tiny_gen``
(generation): the same prompts, the row's output as the target. ``*_chat``: the same documents with
the user turn of the ``chat`` template as the text, for models trained through a chat template
(``+experiment=smollm2``): run them with ``--apply_chat_template``. Few-shot examples come from the
first 64 training rows (``first_n``), so every model sees the same ones.

Offline: the rows are the package's ``assets/tiny/{train,val}.jsonl``, no hub.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import datasets

from diffllm.assets import TINY_TRAIN, TINY_VAL
from diffllm.data.template import get_format

NUM_CHOICES = 4
FEWSHOT_ROWS = 64


def _rows(path: Path, limit: int | None = None) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit is not None else rows


def prompt_text(row: dict) -> str:
    """The ``short`` template the tiny model was trained on (``diffllm.data.template``)."""
    return get_format("short").prompt_text(row)


def user_text(row: dict) -> str:
    """The user turn of the ``chat`` template (``--apply_chat_template``): instruction (+ blank line + input)."""
    instruction, inp = row["instruction"].strip(), (row.get("input") or "").strip()
    return f"{instruction}\n\n{inp}" if inp else instruction


def mc_docs(rows: list[dict]) -> list[dict]:
    """{query, user, choices, gold, task} per row; raises if a task has too few distinct answers."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_task[row["task"]].append(i)
    docs = []
    for i, row in enumerate(rows):
        same = by_task[row["task"]]
        k = same.index(i)
        others: list[str] = []
        for j in same[k + 1 :] + same[:k]:
            out = rows[j]["output"]
            if out != row["output"] and out not in others:
                others.append(out)
            if len(others) == NUM_CHOICES - 1:
                break
        if len(others) < NUM_CHOICES - 1:
            raise ValueError(f"task {row['task']!r} has fewer than {NUM_CHOICES} distinct answers")
        gold = i % NUM_CHOICES
        choices = others[:gold] + [row["output"]] + others[gold:]
        docs.append(
            {
                "query": prompt_text(row),
                "user": user_text(row),
                "choices": choices,
                "gold": gold,
                "task": row["task"],
            }
        )
    return docs


def gen_docs(rows: list[dict]) -> list[dict]:
    return [
        {"query": prompt_text(r), "user": user_text(r), "answer": r["output"], "task": r["task"]}
        for r in rows
    ]


def load_mc(**kwargs) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset`` of ``diffllm_tiny_mc``."""
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(mc_docs(_rows(TINY_TRAIN, FEWSHOT_ROWS))),
            "test": datasets.Dataset.from_list(mc_docs(_rows(TINY_VAL))),
        }
    )


def load_gen(**kwargs) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset`` of ``diffllm_tiny_gen``."""
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(gen_docs(_rows(TINY_TRAIN, FEWSHOT_ROWS))),
            "test": datasets.Dataset.from_list(gen_docs(_rows(TINY_VAL))),
        }
    )
