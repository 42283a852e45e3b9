"""Data that is parsed, not guessed: every bad row reported once with file, line, reason and text."""

from __future__ import annotations

import json
import re

import pytest

from diffllm.assets import TINY_TRAIN
from diffllm.data.datamodule import AlpacaDataModule
from diffllm.data.reader import DataError, parse_file, read_rows

GOOD = {"instruction": "copy cat", "input": "", "output": "cat"}
GOOD2 = {"instruction": "reverse the words", "input": "cat dog", "output": "dog cat"}


def _jsonl(path, rows) -> str:
    """Rows as JSONL; a ``bytes``/``str`` item is written as that line verbatim."""
    lines = []
    for r in rows:
        if isinstance(r, bytes):
            lines.append(r)
        elif isinstance(r, str):
            lines.append(r.encode())
        else:
            lines.append(json.dumps(r).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def _dm(tokenizer, path, tmp_path, **kw) -> AlpacaDataModule:
    args = dict(path=path, val_size=2, template="short", max_length=64, report_dir=str(tmp_path / "run"))
    return AlpacaDataModule(tokenizer, **{**args, **kw})


def _rejected_file(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "rejected_rows.jsonl").read_text().splitlines()]


def test_one_number_in_8001_rows_rejects_exactly_that_row(tmp_path):
    """The issue's reproduction: a numeric output no longer turns the column into numbers."""
    lines = TINY_TRAIN.read_text().splitlines()
    assert len(lines) == 8000
    bad = json.dumps({"instruction": "What is 2 + 2?", "input": "", "output": 4})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines[:4000] + [bad] + lines[4000:]) + "\n")
    ds, rejected = read_rows(str(path))
    assert [(r.line, r.reason) for r in rejected] == [(4001, "not_a_string")]
    assert "'output' must be a string, got int" in rejected[0].detail and rejected[0].text == bad
    originals = [json.loads(line) for line in lines]
    assert len(ds) == 8000
    assert ds["output"][:] == [r["output"] for r in originals]  # "11" stays the string "11"
    assert ds["task"][:] == [r["task"] for r in originals]
    assert ds["source_line"][:] == list(range(1, 4001)) + list(range(4002, 8002))


def test_each_bad_line_is_named_with_its_reason(tmp_path):
    rows = [
        GOOD,
        b'{"instruction": "copy \xff cat", "input": "", "output": "cat"}',  # not UTF-8
        {"instruction": "copy cat", "input": ""},  # no output
        {"instruction": "copy cat", "input": ["a"], "output": "cat"},  # a list as input
        "[1, 2]",  # not an object
        "",  # a blank line: not a row
        {"instruction": "   ", "input": "", "output": "cat"},
        {"instruction": "copy cat", "input": "", "output": "  "},  # empty output
        GOOD2,
        '{"instruction": "copy cat", "input": "", "outp',  # truncated last line
    ]
    rows_ok, rejected = parse_file(_jsonl(tmp_path / "d.jsonl", rows))
    got = [(r.line, r.reason) for r in rejected]
    assert got == [
        (2, "invalid_utf8"),
        (3, "missing_field"),
        (4, "not_a_string"),
        (5, "not_an_object"),
        (7, "empty_instruction"),
        (8, "empty_output"),
        (10, "invalid_json"),
    ]
    at = len(b'{"instruction": "copy ')  # the 0-based byte of \xff in its line, then in the file
    assert f"byte {at} of the line (byte {len(json.dumps(GOOD)) + 1 + at} of the file)" in rejected[0].detail
    assert "\ufffd" in rejected[0].text
    assert "truncated?" in rejected[-1].detail and rejected[-1].text.endswith('"outp')
    assert [(r["source_line"], r["output"]) for r in rows_ok] == [(1, "cat"), (9, "dog cat")]


def test_json_array_rows_keep_their_lines(tmp_path):
    path = tmp_path / "d.json"
    text = json.dumps([GOOD, {**GOOD, "output": 11}, GOOD2], indent=2)
    path.write_text(text)
    rows, rejected = parse_file(path)
    starts = [i + 1 for i, line in enumerate(text.splitlines()) if line == "  {"]
    assert [r["source_line"] for r in rows] == [starts[0], starts[2]]
    assert [(r.line, r.reason) for r in rejected] == [(starts[1], "not_a_string")]
    # a truncated array: the rows before the cut are read, the cut is named by its line
    path.write_text(text[: text.rindex('"dog cat"') + 4])
    rows, rejected = parse_file(path)
    assert [r["source_line"] for r in rows] == [starts[0]]
    assert [(r.line, r.reason) for r in rejected] == [
        (starts[1], "not_a_string"),
        (len(path.read_text().splitlines()), "invalid_json"),
    ]


def test_empty_file_and_missing_path_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty") as err:
        read_rows(str(empty))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="no such file or folder"):
        read_rows(str(tmp_path / "typo.jsonl"))


def test_no_usable_row_fails_in_one_line_and_writes_the_list(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{**GOOD, "output": 1}, {"instruction": 2}, "{"])
    dm = _dm(tokenizer, path, tmp_path)
    with pytest.raises(DataError, match=r"data.path=.*d\.jsonl: no usable row among 3") as err:
        dm.setup()
    assert "\n" not in str(err.value) and "rejected_rows.jsonl" in str(err.value)
    listed = _rejected_file(tmp_path)
    assert [(r["line"], r["reason"]) for r in listed] == [
        (1, "not_a_string"),
        (2, "missing_field"),
        (3, "invalid_json"),
    ]
    assert listed[0]["text"] == json.dumps({**GOOD, "output": 1}) and listed[0]["file"] == path


def test_skip_and_count_or_strict_error(tmp_path, tokenizer):
    rows = [GOOD, GOOD2] * 4 + [{**GOOD, "output": ""}, {**GOOD, "output": 3.5}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    dm = _dm(tokenizer, path, tmp_path)
    dm.setup()
    assert dm.report.rows == 10 and dm.report.counts() == {"empty_output": 1, "not_a_string": 1}
    assert len(dm.train_ds) + len(dm.val_ds) == 8
    assert [(r["line"], r["reason"]) for r in _rejected_file(tmp_path)] == [
        (9, "empty_output"),
        (10, "not_a_string"),
    ]
    strict = _dm(tokenizer, path, tmp_path / "strict", strict=True)
    with pytest.raises(DataError, match=r"data.strict=true and 2 row\(s\) rejected.*d\.jsonl:9"):
        strict.setup()
    assert (tmp_path / "strict" / "run" / "rejected_rows.jsonl").exists()


def test_rows_without_room_are_reported_once_under_their_line(tmp_path, tokenizer):
    long_prompt = {"instruction": "copy " + "cat " * 30, "input": "", "output": "cat"}
    rows = [GOOD, GOOD2, GOOD, long_prompt, GOOD2, GOOD, long_prompt, GOOD2]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    fmt = AlpacaDataModule(tokenizer, template="short").format
    max_length = max(len(fmt.prompt_ids(r, tokenizer)) for r in (GOOD, GOOD2)) + 1  # room for 1 token
    assert len(fmt.prompt_ids(long_prompt, tokenizer)) > max_length
    dm = _dm(tokenizer, path, tmp_path, val_path=path, max_length=max_length, answer_pad_to=4)
    dm.setup()
    report = dm.report
    assert report.no_answer_room == 4  # two rows, in the train and the val file
    cut = sum(
        len(fmt.prompt_ids(r, tokenizer))
        + len(tokenizer(r["output"], add_special_tokens=False)["input_ids"])
        + 1
        > max_length
        for r in rows
        if r is not long_prompt
    )
    assert cut > 0 and report.too_long == 2 * cut  # answers cut short; the no-room rows not counted again
    listed = _rejected_file(tmp_path)
    assert [(r["split"], r["line"], r["reason"]) for r in listed] == [
        ("train", 4, "no_answer_room"),
        ("train", 7, "no_answer_room"),
        ("val", 4, "no_answer_room"),
        ("val", 7, "no_answer_room"),
    ]
    assert json.loads(listed[0]["text"])["instruction"] == long_prompt["instruction"]
    assert len(dm.train_ds) == len(dm.val_ds) == 6
    assert all(p["reference"] != "cat" or "30" not in p["prompt"] for p in dm.sample_prompts(6))
    assert len(dm.val_raw) == 6  # sample prompts come from the rows validation scores
    with pytest.raises(DataError, match=r"data.strict=true and 4 row\(s\).*d\.jsonl:4"):
        _dm(tokenizer, path, tmp_path, val_path=path, max_length=max_length, strict=True).setup()


def test_max_length_too_small_names_the_key_and_the_minimum(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [GOOD, GOOD2] * 4)
    with pytest.raises(DataError, match=r"data.max_length=4 leaves no room.*at least (\d+)") as err:
        _dm(tokenizer, path, tmp_path, max_length=4).setup()
    assert "\n" not in str(err.value)
    minimum = int(re.search(r"at least (\d+)", str(err.value)).group(1))
    shortest = min(
        len(AlpacaDataModule(tokenizer, template="short").format.prompt_ids(r, tokenizer))
        for r in (GOOD, GOOD2)
    )
    assert minimum == shortest + 1
    with pytest.raises(DataError):
        _dm(tokenizer, path, tmp_path, max_length=minimum - 1).setup()
    dm = _dm(tokenizer, path, tmp_path, max_length=minimum, val_path=path)
    dm.setup()  # the minimum keeps the rows with the shortest prompt
    assert len(dm.train_ds) == 4 and all(sum(m) == 1 for m in dm.train_ds["answer_mask"][:])


@pytest.mark.slow
def test_train_with_max_length_4_stops_in_one_line_and_keeps_the_list(tmp_path):
    """The issue's `data.max_length=4` ("num_samples=0" before): a DataError, which `diffllm.training.run`
    prints as one `error:` line with exit status 1; the rejection list is in the run folder."""
    from diffllm.config.resolvers import compose
    from diffllm.training.run import train

    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"^data.max_length=4 leaves no room .* at least \d+ ") as err:
        train(compose(["data.max_length=4", f"output_dir={out}", "trainer.enable_progress_bar=false"]))
    assert "\n" not in str(err.value)
    listed = (out / "rejected_rows.jsonl").read_text().splitlines()
    assert len(listed) == 8000 and json.loads(listed[0])["line"] == 1  # every train row, once
