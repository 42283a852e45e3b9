"""Files written by an older version keep loading, with their old meaning (issue 20, step 3).

``tests/fixtures/layout_61e80a8/`` holds what commit 61e80a8 (the layout by layer, before the
config's defaults moved into the typed nodes) wrote for the embedded default trained 3 steps: its
``last.ckpt``, the adapter ``export`` of it, and the sampler's greedy answers of the first 8
validation prompts from both (``answers.json``, made by ``answers.py``; commands in its README).
The absolute asset paths inside the files (``model.pretrained``, ``data.path`` ...) are mapped to
this checkout's assets; nothing else is touched. Both must decode the same tokens as then.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from diffllm.assets import TINY_DIR
from diffllm.inference.generation import generate_answers
from diffllm.inference.loading import load_for_inference

FIXTURE = Path(__file__).parent / "fixtures" / "layout_61e80a8"
ANSWERS = json.loads((FIXTURE / "answers.json").read_text())

# tiny models on 2 shared cores: OpenMP threads only add spin-wait overhead (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def mapped(node: Any, old: str, new: str) -> Any:
    """``node`` with every string under the folder ``old`` moved under ``new``."""
    if isinstance(node, dict):
        return {k: mapped(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [mapped(v, old, new) for v in node]
    if isinstance(node, str) and node.startswith(old + "/"):
        return new + node[len(old) :]
    return node


def assets() -> tuple[str, str]:
    return ANSWERS["asset_root"], str(TINY_DIR.parent)


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory) -> Path:
    checkpoint = torch.load(FIXTURE / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"] = mapped(checkpoint["hyper_parameters"], *assets())
    path = tmp_path_factory.mktemp("old_ckpt") / "last.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def old_export(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("old_export") / "adapter"
    shutil.copytree(FIXTURE / "adapter", folder)
    card = json.loads((folder / "diffllm.json").read_text())
    (folder / "diffllm.json").write_text(json.dumps(mapped(card, *assets())))
    return folder


def answers_of(path: Path) -> list[dict[str, Any]]:
    model = load_for_inference(path)
    rows = ANSWERS["rows"]
    out = generate_answers(model, [r["instruction"] for r in rows], [r["input"] for r in rows])
    return [{"answer": a["answer"], "answer_ids": a["answer_ids"], "canvas": a["canvas"]} for a in out]


def test_fixture_holds_distinct_answers():
    """The recorded answers are not one repeated token: a wrong model would show."""
    assert len({tuple(a["canvas"]) for a in ANSWERS["checkpoint"]}) >= 3
    assert ANSWERS["adapter"] == ANSWERS["checkpoint"]


def test_old_checkpoint_decodes_as_before(old_checkpoint):
    model = load_for_inference(old_checkpoint)
    # the old file's meaning: prefix-LM attention, the tiny sampler with EOS fill
    assert model.dlm.attention == "prefix_lm"
    assert (model.sampler_config.gen_length, model.sampler_config.steps) == (16, 16)
    assert model.sampler_config.fill_after_eos is True
    assert answers_of(old_checkpoint) == ANSWERS["checkpoint"]


def test_old_export_card_decodes_as_before(old_export):
    assert answers_of(old_export) == ANSWERS["adapter"]


def test_a_model_node_without_attention_keeps_its_old_meaning(tmp_path):
    """Today's default is prefix_lm (``ModelNode.attention``); a checkpoint or card written before
    ``model.attention`` existed was built bidirectional, and still is (``diffllm.config.upgrade``)."""
    from diffllm.config.schema import ModelNode

    assert ModelNode.attention == "prefix_lm"
    checkpoint = torch.load(FIXTURE / "last.ckpt", map_location="cpu", weights_only=True)
    hparams = mapped(checkpoint["hyper_parameters"], *assets())
    del hparams["model"]["attention"]
    torch.save({**checkpoint, "hyper_parameters": hparams}, tmp_path / "old.ckpt")
    assert load_for_inference(tmp_path / "old.ckpt").dlm.attention == "bidirectional"

    folder = tmp_path / "adapter"
    shutil.copytree(FIXTURE / "adapter", folder)
    card = mapped(json.loads((folder / "diffllm.json").read_text()), *assets())
    for node in (card, card["model"], card["run_config"]["model"]):
        del node["attention"]
    (folder / "diffllm.json").write_text(json.dumps(card))
    assert load_for_inference(folder).dlm.attention == "bidirectional"
