"""Prompt/answer spans: exact answer masks, the prompt never noised, bad rows reported not lost."""

from __future__ import annotations

import json

import pytest
import torch

from diffllm.data.datamodule import AlpacaDataModule, Collator, encode_row
from diffllm.data.reader import DataError
from diffllm.data.template import render
from diffllm.diffusion.forward import forward_process

ROW_NO_INPUT = {"instruction": "sort the list", "input": "", "output": "cat dog red"}
ROW_INPUT = {"instruction": "reverse the words", "input": "cat dog", "output": "dog cat"}


def test_template_branches():
    p1, a1 = render(ROW_NO_INPUT, "short")
    p2, a2 = render(ROW_INPUT, "short")
    assert p1 == "### Instruction:\nsort the list\n### Response:\n" and a1 == "cat dog red"
    assert (
        p2 == "### Instruction:\nreverse the words\n### Input:\ncat dog\n### Response:\n" and a2 == "dog cat"
    )
    assert (
        "### Input:" in render(ROW_INPUT, "alpaca")[0]
        and "### Input:" not in render(ROW_NO_INPUT, "alpaca")[0]
    )


@pytest.mark.parametrize("row", [ROW_NO_INPUT, ROW_INPUT])
def test_answer_mask_is_exact(tokenizer, row):
    prompt, answer = render(row, "short")
    p_ids = tokenizer(prompt)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    enc = encode_row(row, tokenizer, "short", max_length=64)
    assert p_ids[0] == tokenizer.bos_token_id
    assert enc["input_ids"] == p_ids + a_ids + [tokenizer.eos_token_id]
    assert enc["answer_mask"] == [0] * len(p_ids) + [1] * (len(a_ids) + 1)
    assert not enc["truncated"]


def test_answer_padding_to_bucket_and_truncation(tokenizer):
    enc = encode_row(ROW_NO_INPUT, tokenizer, "short", max_length=64, answer_pad_to=8)
    n_answer = sum(enc["answer_mask"])
    assert n_answer == 8  # 3 words + EOS, padded with EOS to the bucket
    assert enc["input_ids"][-5:] == [tokenizer.eos_token_id] * 5
    p = enc["prompt_len"]
    # the likelihood is reported on the answer and its first EOS only, never on the padding
    assert enc["score_mask"] == [0] * p + [1] * 4 + [0] * 4
    plain = encode_row(ROW_NO_INPUT, tokenizer, "short", max_length=64)
    assert plain["score_mask"] == plain["answer_mask"] == [0] * p + [1] * 4
    short = encode_row(ROW_NO_INPUT, tokenizer, "short", max_length=len(enc["input_ids"]) - 6)
    assert short["truncated"] and len(short["input_ids"]) == len(enc["input_ids"]) - 6
    assert short["score_mask"] == short["answer_mask"] == [0] * p + [1] * 2
    # padding that does not fit is dropped, the answer is whole: not a truncation
    cut = encode_row(ROW_NO_INPUT, tokenizer, "short", max_length=p + 6, answer_pad_to=8)
    assert not cut["truncated"]
    assert cut["answer_mask"] == [0] * p + [1] * 6 and cut["score_mask"] == [0] * p + [1] * 4 + [0] * 2
    batch = Collator(tokenizer.pad_token_id)([enc, plain])
    assert batch["score_mask"].sum(1).tolist() == [4, 4]
    assert batch["answer_mask"].sum(1).tolist() == [8, 4]


def test_collate_and_prompt_never_hidden(tokenizer):
    rows = [encode_row(r, tokenizer, "short", 64) for r in (ROW_NO_INPUT, ROW_INPUT)]
    batch = Collator(tokenizer.pad_token_id)(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["answer_mask"].dtype == torch.bool
    assert not (batch["answer_mask"] & ~batch["attention_mask"].bool()).any()  # padding never supervised
    # t -> 1 hides every answer token and nothing else
    xt, hidden = forward_process(batch["input_ids"], batch["answer_mask"], torch.ones(2), mask_id=99)
    assert torch.equal(hidden, batch["answer_mask"])
    assert torch.equal(xt[~hidden], batch["input_ids"][~hidden])
    assert (xt[hidden] == 99).all()
    # any t: the prompt is untouched
    for p in (0.3, 0.7):
        xt, hidden = forward_process(
            batch["input_ids"], batch["answer_mask"], torch.full((2,), p), mask_id=99
        )
        assert not (hidden & ~batch["answer_mask"]).any()
        assert torch.equal(xt[~batch["answer_mask"]], batch["input_ids"][~batch["answer_mask"]])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_malformed_rows_are_counted_reported_and_strict_raises(tmp_path, tokenizer):
    good = [ROW_NO_INPUT, ROW_INPUT] * 10
    bad = [{"instruction": "x", "input": "", "output": 5}, {"instruction": "", "input": "", "output": "y"}]
    path = _write_jsonl(tmp_path / "d.jsonl", good[:7] + bad[:1] + good[7:] + bad[1:])
    dm = AlpacaDataModule(
        tokenizer, path=path, val_size=4, template="short", max_length=64, report_dir=str(tmp_path)
    )
    dm.setup()
    assert dm.report.rows == 22 and len(dm.report.rejected) == 2
    assert [r.line for r in dm.report.rejected] == [8, 22]  # the file's lines, 1-based
    assert len(dm.train_ds) + len(dm.val_ds) == 20
    lines = (tmp_path / "rejected_rows.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "must be a string" in json.loads(lines[0])["detail"]
    strict = AlpacaDataModule(tokenizer, path=path, val_size=4, template="short", strict=True)
    with pytest.raises(DataError, match=r"d\.jsonl:8"):
        strict.setup()


def test_split_is_reproducible_and_batches_are_well_formed(tmp_path, tokenizer):
    rows = [
        {"instruction": f"copy {w}", "input": "", "output": w} for w in ("cat dog red blue green".split() * 8)
    ]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    a = AlpacaDataModule(tokenizer, path=path, val_size=8, template="short", batch_size=4, seed=3)
    b = AlpacaDataModule(tokenizer, path=path, val_size=8, template="short", batch_size=4, seed=3)
    a.setup(), b.setup()
    assert a.val_ds["input_ids"] == b.val_ds["input_ids"] and len(a.val_ds) == 8
    batch = next(iter(a.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "answer_mask", "score_mask"}
    assert batch["input_ids"].shape == batch["answer_mask"].shape == batch["attention_mask"].shape
    prompts = a.sample_prompts(2)
    assert prompts == b.sample_prompts(2) and prompts[0]["prompt_ids"][0] == tokenizer.bos_token_id


def test_prompt_without_room_is_reported(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [ROW_INPUT] * 6)
    dm = AlpacaDataModule(tokenizer, path=path, val_size=2, template="alpaca", max_length=8)
    with pytest.raises(
        DataError, match="data.max_length=8 leaves no room for an answer in any of the 4 train rows"
    ):
        dm.setup()
    assert dm.report.no_answer_room == 4 and len(dm.report.rejected) == 4


def test_unloadable_data_names_the_fix(tokenizer):
    dm = AlpacaDataModule(tokenizer, path="no-such-org/no-such-data")
    with pytest.raises(DataError, match="data.path"):
        dm.setup()
