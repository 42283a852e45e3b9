"""data=self_generated: instructions drawn from the chat model itself, its own greedy answers, cached.

The tiny AR base has no chat template, so the builds here give it one (``TEST_TEMPLATE``, in memory
only: the real path reads the tokenizer's own). Its user turn opens with an instruction the tiny
model answers, so what it "writes as the user" is a short list of words ended by ``</s>`` (the
user turn's end), and the assistant's turn asks it to repeat them.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError
from transformers import AutoModelForCausalLM

from diffllm.assets import TINY_AR_BASE
from diffllm.assets import self_generated as sg
from diffllm.assets.self_generated import (
    BUILD_INFO,
    SPLIT_FILES,
    InstructionFilter,
    SelfGeneratedError,
    dataset_dir,
    ensure_self_generated,
    instruction_prompt,
    is_plain,
    is_repetitive,
    is_request,
    normalise_instruction,
    split_rows,
)
from diffllm.config.resolvers import compose, prepare_assets
from diffllm.config.schema import ConfigError, SelfGeneratedNode, check_run_config
from diffllm.data.datamodule import AlpacaDataModule
from diffllm.data.reader import DataError
from diffllm.data.template import ChatFormat
from diffllm.model.ar_generate import ar_generate
from diffllm.model.load import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEST_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "### Instruction:\nWrite some words.\n### Response:\n{{ m['content'] }}</s>"
    "{% else %}\n### Instruction:\nRepeat the words.\n### Response:\n{{ m['content'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}\n### Instruction:\nRepeat the words.\n### Response:\n{% endif %}"
)
# prompts here are 35-45 tokens: some have no room for an answer, some answers are cut (their end
# token not trained), most end within it
MAX_LENGTH = 45


def tiny_settings(cache, **changes) -> SelfGeneratedNode:
    values = dict(
        model=str(TINY_AR_BASE),
        rows=24,
        val_rows=4,
        seed=0,
        batch_size=32,
        max_instruction_tokens=16,
        min_instruction_words=2,
        # word lists are neither questions nor requests, and the tiny model repeats itself
        filters=["not_plain", "too_short", "duplicate"],
        cache=str(cache),
    )
    return SelfGeneratedNode(**{**values, **changes})


@pytest.fixture(scope="module")
def tiny_tok():
    tok = load_tokenizer(str(TINY_AR_BASE))
    tok.chat_template = TEST_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(settings, folder, build info) of a 24-row build from the tiny model."""
    settings = tiny_settings(tmp_path_factory.mktemp("cache"))
    folder = ensure_self_generated(settings, MAX_LENGTH, chat_template=TEST_TEMPLATE, quiet=True)
    return settings, folder, json.loads((folder / BUILD_INFO).read_text())


def read_rows(folder, split):
    return [json.loads(line) for line in (folder / SPLIT_FILES[split]).read_text().splitlines()]


# ----------------------------------------------------------------------------------- the filters

SAMPLES = [  # (text, ended, the reason expected with every filter on; None = kept)
    ("   ", True, "empty"),
    ("What is the capital of France?", False, "too_long"),
    ("<|im_start|>Tell me a joke?", True, "not_plain"),
    ("assistant: How can I help you today?", True, "not_plain"),
    ("Sure, here is a poem about cats.", True, "not_plain"),
    ("Translate this \ufffd text.", True, "not_plain"),
    ("Why?", True, "too_short"),
    ("Tell me more more more more more more more", True, "repetitive"),
    ("The Great Lakes hold a fifth of the world's fresh water.", True, "not_a_request"),
    ("What are the three primary colors?", True, None),
    ("  what are the THREE primary   colors?? ", True, "duplicate"),
    ("Write a haiku about autumn.", True, None),
    ("I need a recipe for a quick dinner tonight.", True, None),
    ("My cat keeps scratching the sofa, any tips", True, None),
    ("Write a haiku about autumn!", True, "duplicate"),
]


def test_each_filter_rejects_with_its_reason_and_counts_it():
    filt = InstructionFilter(min_words=3, special_tokens=["<|im_start|>", "<|im_end|>"])
    reasons = [filt.reason(text, ended) for text, ended, _ in SAMPLES]
    assert reasons == [why for _, _, why in SAMPLES]
    assert filt.counts == Counter(why or "kept" for _, _, why in SAMPLES)
    assert set(filt.counts) == {*sg.REASONS, "kept"}  # every reason is exercised above
    assert filt.examples["duplicate"] == [
        "  what are the THREE primary   colors?? ",
        "Write a haiku about autumn!",
    ]


def test_only_the_listed_filters_apply_beyond_empty_and_too_long():
    filt = InstructionFilter(filters=[], min_words=3)
    reasons = [filt.reason(text, ended) for text, ended, _ in SAMPLES]
    assert reasons == [why if why in ("empty", "too_long") else None for _, _, why in SAMPLES]
    # duplicate alone: the second copy of a kept instruction, whatever else it is
    filt = InstructionFilter(filters=["duplicate"], min_words=3)
    assert [filt.reason(t, True) for t in ("Why?", "why", "Why ?!", "Why not?")] == [
        None,
        "duplicate",
        "duplicate",
        None,
    ]


def test_the_heuristics_one_by_one():
    assert normalise_instruction("  Hello,   WORLD?! ") == "hello, world"
    assert is_repetitive("a b c a b c a b c") and not is_repetitive("a b c a b c d")
    assert is_request("Can you help me plan a trip") and is_request("Is it safe?")
    assert is_request("Please list three fruits") and is_request("Summarize the text below.")
    assert not is_request("I went to the market yesterday.") and not is_request("")
    assert not is_plain("User: hi") and not is_plain("Certainly! Here you go")
    assert is_plain("Surely you know a good book to read?")  # "sure" only as a whole word
    assert not is_plain("Hello <|im_end|>", ["<|im_end|>"]) and is_plain("Hello", ["<|im_end|>"])


def test_split_is_deterministic_disjoint_and_keeps_order():
    rows = [{"instruction": str(i)} for i in range(20)]
    train, val = split_rows(rows, 5, seed=3)
    assert (train, val) == split_rows(rows, 5, seed=3) and split_rows(rows, 5, seed=4)[1] != val
    assert len(val) == 5 and sorted(train + val, key=lambda r: int(r["instruction"])) == rows
    assert train == sorted(train, key=lambda r: int(r["instruction"]))
    assert val == sorted(val, key=lambda r: int(r["instruction"]))


# ----------------------------------------------------------------------------------- the prompts


def test_the_instruction_prompt_is_the_template_up_to_the_user_message(tiny_tok):
    ids, end_id = instruction_prompt(tiny_tok)
    assert tiny_tok.decode(ids) == "<s>### Instruction:\nWrite some words.\n### Response:\n"
    assert end_id == tiny_tok.eos_token_id


def test_a_model_without_chat_template_gets_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFLLM_CACHE", str(tmp_path))
    tok = load_tokenizer(str(TINY_AR_BASE))
    with pytest.raises(
        SelfGeneratedError, match="has no chat template. Fix: `\\+experiment=smollm2 data=self_generated`"
    ):
        instruction_prompt(tok, str(TINY_AR_BASE))
    # through the config: the default tiny model, before any weight loads
    cfg = compose(["data=self_generated", "output_dir=unused"])
    with pytest.raises(SelfGeneratedError, match="has no chat template"):
        prepare_assets(cfg)
    assert list(tmp_path.iterdir()) == []  # refused before anything is written to the cache


def test_smollm2_instruction_prompt_is_its_system_prompt_and_user_header():
    from diffllm.assets.smollm2 import is_built, smollm2_dir

    if not is_built(smollm2_dir()):
        pytest.skip("SmolLM2 not built here (make real-model)")
    tok = load_tokenizer(str(smollm2_dir()))
    ids, end_id = instruction_prompt(tok)
    assert tok.decode(ids) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n"
    )
    assert end_id == ChatFormat().end_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


def test_answer_reasons(tiny_tok):
    prompt = ChatFormat().prompt_ids(sg.chat_row("cat dog"), tiny_tok)
    end_id = ChatFormat().end_id(tiny_tok)
    words = tiny_tok("cat hat", add_special_tokens=False)["input_ids"]
    chars = [tiny_tok.convert_tokens_to_ids(c) for c in "cat"]  # "cat" spelled one byte at a time
    assert (
        len(words) == 2
        and tiny_tok.decode(chars) == "cat"
        and tiny_tok("cat", add_special_tokens=False)["input_ids"] != chars
    )

    def reason(tokens, ended, room, text=None):
        answer = sg.Answer(prompt, tokens, ended, room)
        text = tiny_tok.decode(tokens) if text is None else text
        return sg.answer_reason("cat dog", answer, text, tiny_tok, len(prompt) + room, end_id)

    assert reason(words, True, 3) is None  # ends inside: prompt + answer + end token
    assert reason(words, False, 2) is None  # fills the room: no end token trained
    assert reason(words + words, False, 2) is None  # the margin past max_length is cut by the datamodule
    assert reason(chars, True, 5) == "answer_retokenizes"
    assert reason(words, True, 3, text=" \n ") == "empty_answer"
    assert sg.answer_reason("cat dog", None, "", tiny_tok, len(prompt), end_id) == "no_answer_room"


# ----------------------------------------------------------------------------------- a build


def test_a_build_has_the_rows_asked_and_counts_every_sample(built):
    settings, folder, info = built
    train, val = read_rows(folder, "train"), read_rows(folder, "val")
    assert (len(train), len(val)) == (20, 4) == (info["rows"]["train"], info["rows"]["val"])
    assert all(set(r) == {"instruction", "input", "output"} and r["input"] == "" for r in train + val)
    ins, ans = info["instructions"], info["answers"]
    examined = ins["sampled"] - ins["unexamined"]
    assert sum(ins["counts"].values()) == examined and ins["counts"]["kept"] == ans["answered"]
    assert ans["counts"].get("kept", 0) == 24 == ans["ended_within_max_length"] + ans["cut_at_max_length"]
    assert len({normalise_instruction(r["instruction"]) for r in train + val}) == 24  # no duplicate
    # this model and template exercise both kinds of row and the too_long / too_short filters
    assert ans["ended_within_max_length"] > 0 and ans["cut_at_max_length"] > 0
    assert ins["counts"].get("too_long", 0) > 0 and ins["counts"].get("too_short", 0) > 0
    assert ans["counts"].get("no_answer_room", 0) > 0
    assert info["settings"] == {
        **OmegaConf.to_container(OmegaConf.structured(settings)),
        "max_length": MAX_LENGTH,
    }


def test_same_settings_same_rows(built, tmp_path):
    settings, folder, _ = built
    again = ensure_self_generated(
        replace(settings, cache=str(tmp_path)), MAX_LENGTH, chat_template=TEST_TEMPLATE, quiet=True
    )
    assert again != folder and again.name == folder.name  # another cache, the same key
    for name in SPLIT_FILES.values():
        assert (again / name).read_bytes() == (folder / name).read_bytes()


def test_the_answers_are_the_models_greedy_continuations(built, tiny_tok):
    """Each row, encoded as training encodes it, is the chat prompt, the greedy tokens recomputed
    one prompt at a time (``ar_generate``, and a plain argmax loop without cache), and the end
    token exactly when the greedy answer ended within max_length."""
    _, folder, info = built
    model = AutoModelForCausalLM.from_pretrained(TINY_AR_BASE).eval()
    end_id = ChatFormat().end_id(tiny_tok)
    dm = AlpacaDataModule(
        tiny_tok,
        path=str(folder / "train.jsonl"),
        val_path=str(folder / "val.jsonl"),
        template="chat",
        max_length=MAX_LENGTH,
        self_generated={"rows": 24},
    )
    dm.setup()
    # every row is usable, and exactly the cut ones are truncated at max_length (no end token)
    assert dm.report.rejected == [] and dm.report.too_long == info["answers"]["cut_at_max_length"]
    ended = cut = 0
    for row, enc in zip(read_rows(folder, "train"), dm.train_ds):
        prompt = ChatFormat().prompt_ids(row, tiny_tok)
        room = MAX_LENGTH - len(prompt)
        out = ar_generate(model, [prompt], max_new_tokens=room, eos_id=end_id, pad_id=tiny_tok.pad_token_id)
        greedy, ends_inside = out.tokens[0], out.ended[0] and len(out.tokens[0]) < room
        ids, loop = torch.tensor([prompt]), []
        with torch.no_grad():
            for _ in range(room):
                nxt = int(model(ids).logits[0, -1].argmax())
                if nxt == end_id:
                    break
                loop.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert loop == greedy
        assert enc["input_ids"] == prompt + greedy + ([end_id] if ends_inside else [])
        ended, cut = ended + ends_inside, cut + (not ends_inside)
    assert ended > 0 and cut > 0  # both kinds checked


# ----------------------------------------------------------------------------------- the cache


def test_the_cache_key_same_settings_reuse_other_settings_build(built, monkeypatch, tmp_path):
    settings, folder, _ = built
    calls = []

    def fake_build(s, max_length, out, **kwargs):
        calls.append((s, max_length))
        out.mkdir(parents=True)
        (out / BUILD_INFO).write_text("{}")
        return {}

    monkeypatch.setattr(sg, "build", fake_build)
    assert ensure_self_generated(settings, MAX_LENGTH, chat_template=TEST_TEMPLATE) == folder
    assert calls == []  # found, not rebuilt
    changed = [
        {"seed": 1}, {"rows": 25}, {"val_rows": 5}, {"temperature": 0.9}, {"top_p": 0.9},
        {"max_instruction_tokens": 17}, {"min_instruction_words": 3}, {"filters": ["duplicate"]},
        {"batch_size": 16},
    ]  # fmt: skip
    folders = {dataset_dir(replace(settings, **c), MAX_LENGTH, TEST_TEMPLATE) for c in changed}
    folders |= {dataset_dir(settings, MAX_LENGTH + 1, TEST_TEMPLATE), dataset_dir(settings, MAX_LENGTH, None)}
    assert len(folders) == len(changed) + 2 and folder not in folders
    new = ensure_self_generated(replace(settings, seed=1), MAX_LENGTH, chat_template=TEST_TEMPLATE)
    assert (
        new != folder and new.parent == folder.parent and calls == [(replace(settings, seed=1), MAX_LENGTH)]
    )
    # the key is the model's content, not its path
    copy = tmp_path / "ar_base"
    shutil.copytree(TINY_AR_BASE, copy)
    assert dataset_dir(replace(settings, model=str(copy)), MAX_LENGTH, TEST_TEMPLATE) == folder
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert dataset_dir(replace(settings, model=str(copy)), MAX_LENGTH, TEST_TEMPLATE) != folder


def test_a_shipped_set_is_copied_in_instead_of_built(built, monkeypatch, tmp_path):
    settings, folder, info = built
    shipped_root = tmp_path / "shipped"
    shutil.copytree(folder, shipped_root / folder.name)
    monkeypatch.setattr(sg, "SHIPPED_DIR", shipped_root)
    calls = []

    def fake_build(s, max_length, out, **kwargs):
        calls.append(s.seed)
        out.mkdir(parents=True)
        (out / BUILD_INFO).write_text("{}")
        return {}

    def no_model(*args, **kwargs):
        raise AssertionError("the model was read for a shipped set")

    monkeypatch.setattr(sg, "build", fake_build)
    monkeypatch.setattr(sg, "check_chat_model", no_model)
    other = replace(settings, cache=str(tmp_path / "empty_cache"))  # the cache is not keyed
    got = ensure_self_generated(other, MAX_LENGTH, chat_template=TEST_TEMPLATE)
    assert got.name == folder.name and got.parent != folder.parent and calls == []
    for name in SPLIT_FILES.values():
        assert (got / name).read_bytes() == (folder / name).read_bytes()
    installed = json.loads((got / BUILD_INFO).read_text())
    assert installed.pop("installed_from") == str(shipped_root / folder.name)
    assert installed.pop("folder") == str(got)
    assert installed == {k: v for k, v in info.items() if k != "folder"}
    assert not (got.parent / f".{got.name}.partial").exists()
    # another key finds no shipped set and builds; force builds even where one is shipped
    monkeypatch.setattr(sg, "check_chat_model", lambda *a, **k: None)
    ensure_self_generated(replace(other, seed=1), MAX_LENGTH, chat_template=TEST_TEMPLATE)
    ensure_self_generated(
        replace(settings, cache=str(tmp_path / "c3")), MAX_LENGTH, chat_template=TEST_TEMPLATE, force=True
    )
    assert calls == [1, 0]


def test_the_shipped_sets_are_complete_and_keyed_by_their_settings():
    """Every shipped set has the rows its build_info counts; the SmolLM2 one is the folder that
    ``+experiment=smollm2 data=self_generated`` resolves to (when SmolLM2 is built here)."""
    from diffllm.assets.smollm2 import is_built, smollm2_dir

    shipped = sorted(p for p in sg.SHIPPED_DIR.iterdir() if sg.is_built(p))
    assert shipped, f"no shipped set in {sg.SHIPPED_DIR}"
    for folder in shipped:
        info = json.loads((folder / BUILD_INFO).read_text())
        counts = {split: len(read_rows(folder, split)) for split in SPLIT_FILES}
        assert counts == info["rows"] and sum(counts.values()) == info["settings"]["rows"]
        assert counts["val"] == info["settings"]["val_rows"]
        assert folder.name.endswith("-" + sg.key_digest(info["key"]))
    if not is_built(smollm2_dir()):
        pytest.skip("SmolLM2 not built here (make real-model): its key cannot be recomputed")
    cfg = compose(["+experiment=smollm2", "data=self_generated", "output_dir=unused"])
    settings, max_length = sg.settings_of(cfg.data)
    name = dataset_dir(settings, max_length).name
    assert name in {p.name for p in shipped}
    info = json.loads((sg.SHIPPED_DIR / name / BUILD_INFO).read_text())
    assert info["key"] == sg.build_key(settings, max_length)


# ----------------------------------------------------------------------------------- the config


def test_the_config_resolves_to_the_cached_files_without_building(tmp_path):
    cfg = compose(["data=self_generated", f"data.self_generated.cache={tmp_path}", "output_dir=unused"])
    settings, max_length = sg.settings_of(cfg.data)
    assert (settings.model, max_length) == (str(TINY_AR_BASE), 160)
    folder = dataset_dir(settings, max_length)
    folder.mkdir(parents=True)
    (folder / BUILD_INFO).write_text("{}")  # built: nothing loads
    assert cfg.data.path == str(folder / "train.jsonl") and cfg.module.data.val_path == str(
        folder / "val.jsonl"
    )
    cfg.data.max_length = 96  # another key: not built, so resolving would build (and refuse the tiny model)
    with pytest.raises(InterpolationResolutionError, match="SelfGeneratedError .* has no chat template"):
        cfg.data.path  # noqa: B018


def test_the_schema_checks_without_building():
    cfg = compose(["+experiment=smollm2", "data=self_generated", "output_dir=unused"])
    node = check_run_config(cfg)  # no model, no data: the resolvers are not run
    assert node.data.self_generated.rows == 1500 and node.data.template == "chat"
    for override, message in (
        (
            "data.template=short",
            "data.template='short' is out of range; valid: chat with data=self_generated",
        ),
        ("data.self_generated.val_rows=1500", "data.self_generated.val_rows=1500 is out of range"),
        ("data.self_generated.filters=[not_plain,typo]", "data.self_generated.filters="),
        ("data.self_generated.temperature=0", "data.self_generated.temperature=0.0 is out of range"),
    ):
        with pytest.raises(ConfigError, match=message.replace("[", "\\[")):
            check_run_config(
                compose(["+experiment=smollm2", "data=self_generated", "output_dir=unused", override])
            )


def test_missing_files_name_the_rebuild(tmp_path, tiny_tok):
    dm = AlpacaDataModule(
        tiny_tok, path=str(tmp_path / "gone.jsonl"), template="chat", self_generated={"rows": 24}
    )
    with pytest.raises(
        DataError, match="self-generated data set this run was trained on is not in this machine"
    ):
        dm.setup()


def test_the_assets_command_refuses_a_model_without_chat_template(capsys, monkeypatch, tmp_path):
    from diffllm.assets.__main__ import main

    monkeypatch.setenv("DIFFLLM_CACHE", str(tmp_path))

    with pytest.raises(SystemExit) as stop:
        main(["self_generated", "data.self_generated.rows=10", "data.self_generated.val_rows=2"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data=self_generated needs a chat model")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):  # overrides belong to self_generated only
        main(["tiny", "data.self_generated.rows=10"])


def test_a_stopped_build_resumes_to_the_same_rows(built, monkeypatch, tmp_path):
    settings, folder, info = built
    assert info["instructions"]["rounds"] >= 2 and info["sessions"] == 1
    sample = sg.sample_instructions
    calls = []

    def stop_in_round_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill after the first round's state was saved
        return sample(*args, **kwargs)

    monkeypatch.setattr(sg, "sample_instructions", stop_in_round_two)
    other = replace(settings, cache=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        ensure_self_generated(other, MAX_LENGTH, chat_template=TEST_TEMPLATE, quiet=True)
    partial = dataset_dir(other, MAX_LENGTH, TEST_TEMPLATE)
    partial = partial.parent / f".{partial.name}.partial"
    assert json.loads((partial / sg.STATE).read_text())["rounds"] == 1
    monkeypatch.setattr(sg, "sample_instructions", sample)
    again = ensure_self_generated(other, MAX_LENGTH, chat_template=TEST_TEMPLATE, quiet=True)
    resumed = json.loads((again / BUILD_INFO).read_text())
    assert resumed["sessions"] == 2 and not partial.exists()
    for name in SPLIT_FILES.values():
        assert (again / name).read_bytes() == (folder / name).read_bytes()
    for key in ("instructions", "answers"):
        assert resumed[key]["counts"] == info[key]["counts"]


def test_the_settings_reach_the_checkpoint_as_plain_values(tiny_tok, tmp_path):
    """Hydra hands the datamodule its ``self_generated`` node as a DictConfig; Lightning saves the
    datamodule's hyperparameters in the checkpoint, which must load with ``weights_only=True``."""
    node = OmegaConf.create({"model": "m", "rows": 24, "filters": ["duplicate"]})
    dm = AlpacaDataModule(tiny_tok, path="unused.jsonl", template="chat", self_generated=node)
    assert dm.hparams["self_generated"] == {"model": "m", "rows": 24, "filters": ["duplicate"]}
    torch.save({"datamodule_hyper_parameters": dict(dm.hparams)}, tmp_path / "x.ckpt")
    loaded = torch.load(tmp_path / "x.ckpt", weights_only=True)
    assert loaded["datamodule_hyper_parameters"]["self_generated"]["filters"] == ["duplicate"]
