"""Padding encoded rows into batches (no ``datasets`` import: benchmarks and inference use it alone)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Collator:
    """Right-pads a list of encoded rows into (B, L) tensors."""

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            length += -length % self.pad_to_multiple_of
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        answer_mask = torch.zeros((batch, length), dtype=torch.bool)
        score_mask = torch.zeros((batch, length), dtype=torch.bool)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = torch.as_tensor(r["input_ids"])
            attention_mask[i, :n] = 1
            answer_mask[i, :n] = torch.as_tensor(r["answer_mask"], dtype=torch.bool)
            score_mask[i, :n] = torch.as_tensor(r.get("score_mask", r["answer_mask"]), dtype=torch.bool)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "answer_mask": answer_mask,
            "score_mask": score_mask,
        }


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (B, P) and attention mask (B, P), padded on the left."""
    if not prompts:
        raise ValueError("prompts is empty; pass a list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def truncate_at_eos(row: list[int], eos_id: int) -> list[int]:
    """The tokens before the first ``eos_id`` (all of them when there is none)."""
    return row[: row.index(eos_id)] if eos_id in row else row
