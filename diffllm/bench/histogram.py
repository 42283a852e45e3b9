"""The Alpaca length histogram (``alpaca_lengths.json``, written by ``python -m diffllm.bench.lengths``)
read back, and benchmark rows drawn from it (``diffllm.bench.train``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

HISTOGRAM = Path(__file__).with_name("alpaca_lengths.json")


def load_histogram(path: str | Path = HISTOGRAM) -> tuple[list[tuple[int, int]], list[int], dict]:
    """(pairs, counts, provenance) of a histogram written by ``diffllm.bench.lengths``."""
    data = json.loads(Path(path).read_text())
    pairs = [(int(p), int(a)) for p, a, _ in data["counts"]]
    return pairs, [int(c) for *_, c in data["counts"]], data["provenance"]


def sample_lengths(n: int, seed: int = 0, path: str | Path = HISTOGRAM) -> list[tuple[int, int]]:
    """``n`` (prompt, answer) length pairs drawn with replacement, in proportion to the counts."""
    pairs, counts, _ = load_histogram(path)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(torch.tensor(counts, dtype=torch.float), n, replacement=True, generator=gen)
    return [pairs[i] for i in idx.tolist()]
