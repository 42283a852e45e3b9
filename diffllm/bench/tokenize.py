"""Tokenisation benchmark: the data pipeline's first run and its cache hit in a new run folder.

    python -m diffllm.bench.tokenize [--rows 52002] [--seed-rows FILE.json[l]] [--tokenizer PATH]

It writes ``--rows`` Alpaca-shaped rows to a temporary JSONL file (the seed rows repeated, each
copy's instruction numbered so no two rows are equal), points ``HF_DATASETS_CACHE`` at a fresh
temporary folder and times, in this process, what ``trainer.fit`` runs on the data:
``prepare_data()`` then ``setup()`` of an ``AlpacaDataModule`` with the Alpaca template,
``max_length=512`` and ``answer_pad_to=64``. Run 1 starts from an empty cache; run 2 is a new
datamodule with another run folder (``report_dir``), a new tokenizer object, the same data: it
should load run 1's cache files instead of tokenising again. It also prints the padding fraction
of one epoch of training batches (``--batch-size``, default 16 as ``data=alpaca``) in random order
and length-grouped (``data.group_by_length``).

Defaults: the seed rows are the embedded tiny validation set (``--seed-rows`` takes any Alpaca
JSON/JSONL file, e.g. a sample of real Alpaca rows, for Alpaca's length distribution); the
tokenizer is the embedded tiny one (``--tokenizer`` takes any Hugging Face tokenizer folder, e.g.
SmolLM2's). ``build_table`` is pure and unit-tested; the timings are not tests.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Run:
    """One datamodule's prepare_data + setup."""

    name: str
    prepare_s: float
    setup_s: float
    cache_files: tuple[str, ...]  # the train split's arrow files after setup


def alpaca_shaped_rows(seed_rows: Sequence[dict[str, Any]], n: int) -> list[dict[str, str]]:
    """``n`` rows cycling through ``seed_rows``; copy k > 0 numbers its instruction (``(k) ...``)."""
    if not seed_rows:
        raise ValueError("no seed rows: give --seed-rows a non-empty Alpaca JSON/JSONL file")
    out = []
    for i in range(n):
        row = seed_rows[i % len(seed_rows)]
        copy = i // len(seed_rows)
        instruction = row["instruction"] if copy == 0 else f"({copy}) {row['instruction']}"
        out.append({"instruction": instruction, "input": row.get("input") or "", "output": row["output"]})
    return out


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    text = Path(path).read_text()
    if str(path).endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def build_table(runs: Sequence[Run], rows: int, tokenizer: str) -> str:
    """Markdown table: seconds per run and whether the run reused the first run's cache files."""
    first = runs[0].cache_files
    lines = [
        f"tokenising {rows:,d} Alpaca-shaped rows, tokenizer {tokenizer}",
        "",
        "| run | prepare_data s | setup s | total s | cache files as run 1 |",
        "|---|---:|---:|---:|---|",
    ]
    for r in runs:
        same = "yes" if r.cache_files == first else "no"
        lines.append(
            f"| {r.name} | {r.prepare_s:.2f} | {r.setup_s:.2f} | {r.prepare_s + r.setup_s:.2f} | {same} |"
        )
    return "\n".join(lines)


def padding_fraction(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """Share of the positions of right-padded batches (consecutive ``order`` slices) that are padding."""
    real = total = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        real += sum(batch)
        total += max(batch) * len(batch)
    return 1 - real / total


def padding_table(lengths: Sequence[int], batch_size: int, seed: int = 0) -> str:
    """Markdown: one epoch's padding fraction, random batches vs length-grouped ones."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    random_order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    grouped = list(
        LengthGroupedSampler(batch_size, lengths=list(lengths), generator=torch.Generator().manual_seed(seed))
    )
    rows = [("random", padding_fraction(lengths, random_order, batch_size))]
    rows.append(("length-grouped", padding_fraction(lengths, grouped, batch_size)))
    lines = [f"| training batches of {batch_size} | padding fraction |", "|---|---:|"]
    lines += [f"| {name} | {frac:.3f} |" for name, frac in rows]
    return "\n".join(lines)


def time_datamodule(name: str, tokenizer_path: str, data: Path, run_dir: Path) -> tuple[Run, list[int]]:
    from diffllm.data.datamodule import AlpacaDataModule
    from diffllm.model.load import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    tok.add_special_tokens({"mask_token": "[MASK]"})  # as the conversion does
    dm = AlpacaDataModule(
        tok,
        path=str(data),
        val_size=500,
        template="alpaca",
        max_length=512,
        answer_pad_to=64,
        report_dir=str(run_dir),
    )
    t0 = time.perf_counter()
    dm.prepare_data()
    t1 = time.perf_counter()
    dm.setup()
    t2 = time.perf_counter()
    files = tuple(Path(c["filename"]).name for c in dm.train_ds.cache_files)
    return Run(name, t1 - t0, t2 - t1, files), dm.train_ds["length"][:]


def main(argv: Sequence[str] | None = None) -> str:
    from diffllm.assets import TINY_DIR

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=52_002, help="rows to tokenise (Alpaca has 52,002)")
    ap.add_argument("--seed-rows", default=str(TINY_DIR / "val.jsonl"), help="Alpaca JSON/JSONL to repeat")
    ap.add_argument("--tokenizer", default=str(TINY_DIR / "ar_base"), help="tokenizer folder or hub id")
    ap.add_argument("--batch-size", type=int, default=16, help="training batch size for the padding table")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "rows.jsonl"
        with open(data, "w") as f:
            for row in alpaca_shaped_rows(read_rows(args.seed_rows), args.rows):
                f.write(json.dumps(row) + "\n")
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf_cache")
        import datasets

        datasets.config.HF_DATASETS_CACHE = Path(os.environ["HF_DATASETS_CACHE"])
        datasets.disable_progress_bars()
        first, lengths = time_datamodule("1: empty cache", args.tokenizer, data, tmp / "run1")
        second, _ = time_datamodule("2: new run folder", args.tokenizer, data, tmp / "run2")
    table = build_table([first, second], args.rows, Path(args.tokenizer).name or args.tokenizer)
    table += "\n\n" + padding_table(lengths, args.batch_size)
    print(table, flush=True)
    return table


if __name__ == "__main__":
    main()
