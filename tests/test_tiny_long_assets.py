"""The long-answer embedded world (diffllm/assets/tiny_long): generator, committed data, tokenizer, AR base."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from diffllm.assets import TINY_AR_BASE, TINY_LONG_AR_BASE, TINY_LONG_DIR, TINY_VAL, build_info, missing_files
from diffllm.assets.build import BUILD_CONFIGS, BuildConfig, warm_start
from diffllm.data.template import render
from diffllm.data.tiny_long_tasks import TASKS, generate_rows, generate_short_rows, read_jsonl, write_jsonl
from diffllm.data.tiny_tasks import WORDS, split_of
from diffllm.data.tiny_tasks import read_jsonl as read_tiny
from diffllm.model.ar_generate import ar_generate

TRAIN, VAL = TINY_LONG_DIR / "train.jsonl", TINY_LONG_DIR / "val.jsonl"
INFO = build_info(TINY_LONG_DIR)


def solve(instruction: str, inp: str, words_per_list: tuple[int, int] = (17, 32)) -> tuple[str, str]:
    """(task, answer) recomputed from the text alone, without the generator's code."""
    listed = re.fullmatch(r"(Repeat|Reverse) this list: ([a-z, ]+)", instruction)
    if listed or instruction in ("Repeat the list.", "Reverse the list."):
        verb, text = (listed.group(1), listed.group(2)) if listed else (instruction.split()[0], inp)
        words = text.split(", ")
        lo, hi = words_per_list
        assert lo <= len(words) <= hi and len(set(words)) == len(words) and set(words) <= set(WORDS)
        return ("long_copy", text) if verb == "Repeat" else ("long_reverse", ", ".join(words[::-1]))
    up = re.fullmatch(r"Count from (\d+) to (\d+)\.", instruction) or (
        instruction == "Count up." and re.fullmatch(r"from (\d+) to (\d+)", inp)
    )
    down = re.fullmatch(r"Count down from (\d+) to (\d+)\.", instruction) or (
        instruction == "Count down." and re.fullmatch(r"from (\d+) to (\d+)", inp)
    )
    if up:
        low, high = int(up.group(1)), int(up.group(2))
        assert 11 <= high - low + 1 <= 21 and 10 <= low < high <= 99
        return "count_up", " ".join(map(str, range(low, high + 1)))
    if down:
        high, low = int(down.group(1)), int(down.group(2))
        assert 11 <= high - low + 1 <= 21 and 10 <= low < high <= 99
        return "count_down", " ".join(map(str, range(high, low - 1, -1)))
    raise AssertionError(f"unknown problem {instruction!r} / {inp!r}")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_LONG_AR_BASE)


def test_assets_complete_and_the_tiny_world_untouched():
    assert missing_files(TINY_LONG_DIR) == []
    assert INFO["build_config"]["n_train"] == len(read_jsonl(TRAIN)) == 6000
    assert len(read_jsonl(VAL)) == 500
    # the tiny set's files are not the long set's (a second world beside it, not a rebuild of it)
    assert read_tiny(TINY_VAL)[0] != read_jsonl(VAL)[0]


def test_committed_data_equals_regeneration(tmp_path):
    for path, n, seed, split in ((TRAIN, 6000, 0, "train"), (VAL, 500, 1, "val")):
        again = write_jsonl(generate_rows(n, seed, split), tmp_path / path.name)
        assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("path", [TRAIN, VAL], ids=["train", "val"])
def test_every_output_is_the_correct_answer(path):
    rows = read_jsonl(path)
    for row in rows:
        assert solve(row["instruction"], row["input"]) == (row["task"], row["output"])
    assert {r["task"] for r in rows} == set(TASKS)


def test_splits_are_disjoint():
    train = {(r["instruction"], r["input"]) for r in read_jsonl(TRAIN)}
    val = {(r["instruction"], r["input"]) for r in read_jsonl(VAL)}
    assert not train & val
    assert all(split_of(*key) == "val" for key in val) and all(split_of(*key) == "train" for key in train)


def test_answers_are_32_to_63_tokens_of_the_tiny_tokenizer(tokenizer):
    tiny = AutoTokenizer.from_pretrained(TINY_AR_BASE)
    assert tokenizer.get_vocab() == tiny.get_vocab() and tokenizer.model_max_length == 256
    lengths = []
    for row in read_jsonl(VAL):
        prompt, answer = render(row, "short")
        ids = tokenizer(answer, add_special_tokens=False).input_ids
        assert tokenizer(prompt + answer).input_ids == tokenizer(prompt).input_ids + ids
        lengths.append(len(ids))
    assert min(lengths) == 32 and max(lengths) == 63


def test_ar_base_has_256_positions_and_copies_reverses_and_counts_greedily(tokenizer):
    """The base answers every task (build_info, 500 val rows: copy 0.99, reverse 0.94, count up / down
    0.95 / 0.98 exact match; the first base, from random weights on the long rows alone, copied and
    reversed nothing: docs/speculative.md): greedy answers of the first 8 val rows of each task, at
    least 7 right per task."""
    model = AutoModelForCausalLM.from_pretrained(TINY_LONG_AR_BASE).eval()
    assert model.config.max_position_embeddings == 256 and model.config.tie_word_embeddings
    assert min(INFO["metrics"]["exact_match"].values()) >= 0.9
    rows = [r for task in TASKS for r in [r for r in read_jsonl(VAL) if r["task"] == task][:8]]
    prompts = [tokenizer(render(row, "short")[0]).input_ids for row in rows]
    out = ar_generate(model, prompts, max_new_tokens=72, eos_id=tokenizer.eos_token_id, pad_id=0)
    right = {task: 0 for task in TASKS}
    for tokens, row in zip(out.tokens, rows):
        right[row["task"]] += tokenizer.decode(tokens).strip() == row["output"]
    assert min(right.values()) >= 7, right


def test_short_rows_are_correct_3_to_16_word_lists_of_the_train_split_and_not_in_train_jsonl():
    """The AR base's warm-up rows: copy / reverse in turn, every list length from 3 to 16, the train
    side of the split (so never a val problem), deterministic, and none of them in the committed data
    (the conversion trains on train.jsonl alone)."""
    rows = generate_short_rows(300, seed=2)
    assert rows == generate_short_rows(300, seed=2) and rows != generate_short_rows(300, seed=3)
    assert [r["task"] for r in rows[:4]] == ["long_copy", "long_reverse", "long_copy", "long_reverse"]
    lengths = set()
    for row in rows:
        assert solve(row["instruction"], row["input"], words_per_list=(3, 16)) == (row["task"], row["output"])
        assert split_of(row["instruction"], row["input"]) == "train"
        lengths.add(len(row["output"].split(", ")))
    assert lengths == set(range(3, 17))
    committed = {(r["instruction"], r["input"]) for r in read_jsonl(TRAIN) + read_jsonl(VAL)}
    assert not committed & {(r["instruction"], r["input"]) for r in rows}
    assert INFO["build_config"]["short_rows"] == BUILD_CONFIGS["tiny_long"].short_rows > 0


def test_warm_start_keeps_the_tiny_weights_with_256_positions_and_refuses_another_architecture():
    tokenizer = AutoTokenizer.from_pretrained(TINY_AR_BASE)
    tiny = AutoModelForCausalLM.from_pretrained(TINY_AR_BASE).eval()
    special = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(**special, **BUILD_CONFIGS["tiny_long"].model)
    model = warm_start(config, "tiny").eval()
    assert model.config.max_position_embeddings == 256 != tiny.config.max_position_embeddings
    ours, theirs = model.state_dict(), tiny.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.tensor([tokenizer("Repeat these words: cat dog sun").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny(ids).logits)
    with pytest.raises(ValueError, match=r"init_from='tiny'.*hidden_size.*\(128, 64\)"):
        warm_start(LlamaConfig(**special, **{**BuildConfig().model, "hidden_size": 64}), "tiny")
