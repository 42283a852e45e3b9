"""The data pipeline at scale: batched tokenisation, its cache across run folders, length grouping."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pytest
import torch

from diffllm.bench.tokenize import Run, alpaca_shaped_rows, build_table, padding_fraction, padding_table
from diffllm.data.datamodule import AlpacaDataModule, encode_row, encode_rows

WORDS = "cat dog red blue green apple pear one two three four five".split()


def _rows(n: int, seed: int = 0, long_every: int = 10) -> list[dict[str, str]]:
    """Skewed lengths: most answers 1-3 words, every ``long_every``-th one 20-40 words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(20, 40) if i % long_every == 0 else rng.randint(1, 3)
        out.append(
            {
                "instruction": f"copy {rng.choice(WORDS)}",
                "input": " ".join(rng.choices(WORDS, k=rng.randint(0, 2))),
                "output": " ".join(rng.choices(WORDS, k=k)),
            }
        )
    return out


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A private ``datasets`` cache folder: what one test writes, no other test sees."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_batched_encoding_equals_row_by_row(tokenizer):
    rows = _rows(40)
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    for pad_to, max_length in ((None, 64), (8, 64), (16, 12)):
        batched = encode_rows(columns, tokenizer, "short", max_length, pad_to)
        for i, row in enumerate(rows):
            one = encode_row(row, tokenizer, "short", max_length, pad_to)
            assert {k: v[i] for k, v in batched.items()} == one
            assert one["length"] == len(one["input_ids"])
    assert any(batched["truncated"])  # the max_length=12 case cuts some answers


def test_second_run_folder_reuses_the_tokenised_cache(tmp_path, tokenizer, hf_cache):
    """The map function's fingerprint holds what changes the tokens, not the run folder."""
    path = _write(tmp_path / "d.jsonl", _rows(300))
    kw = dict(path=path, val_size=20, template="short", max_length=64, answer_pad_to=8)
    first = AlpacaDataModule(tokenizer, report_dir=str(tmp_path / "run1"), **kw)
    first.prepare_data()
    first.setup()
    files = [c["filename"] for c in first.train_ds.cache_files]
    assert files and all(str(hf_cache) in f for f in files)
    written = {f: Path(f).stat().st_mtime_ns for f in files}

    second = AlpacaDataModule(tokenizer, report_dir=str(tmp_path / "run2"), **kw)
    second.prepare_data()
    second.setup()
    assert [c["filename"] for c in second.train_ds.cache_files] == files
    assert {f: Path(f).stat().st_mtime_ns for f in files} == written  # loaded, not rewritten
    assert second.train_ds["input_ids"][:] == first.train_ds["input_ids"][:]

    # what does change the tokens gets its own cache
    other = AlpacaDataModule(tokenizer, report_dir=str(tmp_path / "run3"), **{**kw, "answer_pad_to": 16})
    other.setup()
    assert [c["filename"] for c in other.train_ds.cache_files] != files


def _pad_frac(loader) -> float:
    real = total = 0
    for batch in loader:
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    return 1 - real / total


def test_length_grouping_cuts_padding_keeps_every_row_once_and_is_seeded(tmp_path, tokenizer, hf_cache):
    path = _write(tmp_path / "d.jsonl", _rows(400))

    def dm(group: bool, seed: int = 0) -> AlpacaDataModule:
        d = AlpacaDataModule(
            tokenizer,
            path=path,
            val_size=40,
            template="short",
            max_length=64,
            batch_size=8,
            seed=seed,
            group_by_length=group,
        )
        d.setup()
        return d

    grouped, plain = dm(True), dm(False)
    n = len(grouped.train_ds)
    frac_grouped, frac_plain = _pad_frac(grouped.train_dataloader()), _pad_frac(plain.train_dataloader())
    assert frac_grouped < 0.5 * frac_plain, (frac_grouped, frac_plain)

    loader = grouped.train_dataloader()
    epoch1, epoch2 = list(loader.sampler), list(loader.sampler)
    assert sorted(epoch1) == sorted(epoch2) == list(range(n))  # every row exactly once per epoch
    assert epoch1 != epoch2  # a new order every epoch
    assert list(dm(True).train_dataloader().sampler) == epoch1  # same seed, same order
    assert list(dm(True, seed=1).train_dataloader().sampler) != epoch1
    # batches hold rows of similar length: within a batch the spread is small
    lengths = grouped.train_ds["length"][:]
    spreads = [
        max(lengths[i] for i in epoch1[s : s + 8]) - min(lengths[i] for i in epoch1[s : s + 8])
        for s in range(0, n, 8)
    ]
    assert sorted(spreads)[len(spreads) // 2] <= 3

    # validation is never grouped: the fixed order `evaluate` reproduces val/nll_bound with
    val = torch.cat([b["input_ids"][:, :4] for b in grouped.val_dataloader()])
    val_plain = torch.cat([b["input_ids"][:, :4] for b in plain.val_dataloader()])
    assert torch.equal(val, val_plain)
    assert isinstance(grouped.val_dataloader().sampler, torch.utils.data.SequentialSampler)


def test_tokenize_bench_rows_and_table():
    seed = [
        {"instruction": "a", "input": "", "output": "x"},
        {"instruction": "b", "input": "i", "output": "y"},
    ]
    rows = alpaca_shaped_rows(seed, 5)
    assert [r["instruction"] for r in rows] == ["a", "b", "(1) a", "(1) b", "(2) a"]
    assert len({json.dumps(r) for r in rows}) == 5
    table = build_table(
        [Run("1", 10.0, 0.5, ("c1",)), Run("2", 0.25, 0.5, ("c1",)), Run("3", 1, 1, ("c2",))], 5, "t"
    )
    lines = table.splitlines()
    assert lines[-3] == "| 1 | 10.00 | 0.50 | 10.50 | yes |"
    assert lines[-2] == "| 2 | 0.25 | 0.50 | 0.75 | yes |" and lines[-1].endswith("| no |")


def test_padding_fraction_by_hand():
    lengths = [2, 4, 4, 1]
    assert padding_fraction(lengths, [0, 1, 2, 3], 2) == pytest.approx(1 - 11 / (8 + 8))
    assert padding_fraction(lengths, [1, 2, 0, 3], 2) == pytest.approx(1 - 11 / (8 + 4))
    table = padding_table([1] * 200 + [30] * 56, batch_size=8).splitlines()
    random_frac, grouped_frac = (float(line.split("|")[2]) for line in table[2:])
    assert grouped_frac < 0.5 * random_frac  # at most one mixed batch per mega-batch


def test_length_grouped_order_is_split_over_ranks_and_stays_grouped(tmp_path, tokenizer, hf_cache):
    """Under DDP every rank builds the training sampler for its rank (a DistributedSampler, which
    Lightning keeps): rank r takes every world-th index of the same seeded order, so the ranks
    split the epoch and stay length-grouped."""
    from diffllm.data.order import ResumableSampler

    path = _write(tmp_path / "d.jsonl", _rows(400))
    dm = AlpacaDataModule(
        tokenizer, path=path, val_size=40, template="short", batch_size=8, seed=0, group_by_length=True
    )
    dm.setup()
    n, lengths = len(dm.train_ds), dm.train_ds["length"][:]
    order = list(ResumableSampler(n, 16, seed=0, lengths=lengths))  # one process, the global batch
    ranks = [list(ResumableSampler(n, 8, seed=0, lengths=lengths, num_replicas=2, rank=r)) for r in (0, 1)]
    assert ranks[0] == order[0::2] and ranks[1] == order[1::2]
    assert sorted(ranks[0] + ranks[1]) == list(range(n))  # n is even here: no row repeated
    spreads = [
        max(lengths[i] for i in ranks[0][s : s + 8]) - min(lengths[i] for i in ranks[0][s : s + 8])
        for s in range(0, len(ranks[0]), 8)
    ]
    assert sorted(spreads)[len(spreads) // 2] <= 3
