"""Export -> reload: adapter and merged folders give the checkpoint's logits and stay bidirectional."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffllm.cli.export import main
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.inference.export import export_model
from diffllm.inference.loading import InferenceModel, load_exported, load_for_inference, read_card
from diffllm.model.attention import is_bidirectional
from diffllm.model.load import build_diffusion_model

LORA = {
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


# tiny models on 2 shared cores: OpenMP threads only add spin-wait overhead (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint_model(tiny_run):
    return load_for_inference(tiny_run[1])


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """``python -m diffllm.export ckpt_path=... out=...`` run in-process (Hydra reads sys.argv)."""
    out = tmp_path_factory.mktemp("export")
    argv = sys.argv
    sys.argv = ["diffllm.export", f"ckpt_path={tiny_run[1]}", f"out={out}"]
    try:
        main()
    finally:
        sys.argv = argv
    return out


def probe_batch(im: InferenceModel) -> torch.Tensor:
    """(2, L) prompt + partly masked answer, the second row left-padded: masks, padding and [MASK] rows all used."""
    tok = im.tokenizer
    ids = tok("### Instruction:\nReverse these words: cat dog sun\n### Response:\n")["input_ids"]
    answer = tok("sun dog cat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    row = ids + [im.dlm.mask_id if i % 2 == 0 else t for i, t in enumerate(answer)]
    return torch.tensor([row, [tok.pad_token_id] * 3 + row[:-3]])


def logits(im: InferenceModel, ids: torch.Tensor) -> torch.Tensor:
    attention_mask = (
        torch.arange(ids.shape[1]) >= (ids == im.tokenizer.pad_token_id).sum(1, keepdim=True)
    ).long()
    with torch.no_grad():
        return im.dlm(ids, attention_mask)


@pytest.mark.parametrize("kind", ["adapter", "merged"])
def test_export_reloads_to_the_checkpoints_logits(checkpoint_model, exported, kind):
    reloaded = load_exported(exported / kind)
    ids = probe_batch(checkpoint_model)
    assert reloaded.dlm.mask_id == checkpoint_model.dlm.mask_id
    assert reloaded.dlm.shift == checkpoint_model.dlm.shift
    torch.testing.assert_close(logits(reloaded, ids), logits(checkpoint_model, ids), atol=1e-5, rtol=1e-5)
    assert reloaded.sampler_config == checkpoint_model.sampler_config
    assert reloaded.cfg["model"] == checkpoint_model.cfg["model"]

    # still bidirectional after the reload: the last token reaches position 0 (unpadded, SDPA)
    assert is_bidirectional(reloaded.dlm.model)
    x = ids[:1].clone()
    y = x.clone()
    y[0, -1] = reloaded.tokenizer.eos_token_id if x[0, -1] != reloaded.tokenizer.eos_token_id else 5
    with torch.no_grad():
        raw_x, raw_y = reloaded.dlm.base(x).logits, reloaded.dlm.base(y).logits
    assert (raw_x[0, 0] - raw_y[0, 0]).abs().max() > 1e-4


def test_trained_mask_row_survives_both_formats(checkpoint_model, exported):
    """The tiny default trains the [MASK] row: the merged embedding holds the trained row, the
    adapter holds its trainable-token delta (and not the whole embedding)."""
    mask_id = checkpoint_model.dlm.mask_id
    trained = checkpoint_model.dlm.model.get_input_embeddings()(torch.tensor([mask_id]))[0]
    base_row = checkpoint_model.dlm.base.get_input_embeddings().token_adapter.base_layer.weight[mask_id]
    assert (trained - base_row).abs().max() > 1e-3  # the row did move in training

    merged = AutoModelForCausalLM.from_pretrained(exported / "merged")
    torch.testing.assert_close(merged.get_input_embeddings().weight[mask_id], trained.detach())

    with safe_open(exported / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("trainable_tokens_delta" in k for k in keys)
    assert not any(k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight") for k in keys)


def test_merged_folder_is_plain_hugging_face(checkpoint_model, exported):
    folder = exported / "merged"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    card = json.loads((folder / "diffllm.json").read_text())
    assert tok.mask_token == "[MASK]" and tok.mask_token_id == card["mask_id"] == checkpoint_model.dlm.mask_id
    assert len(tok) == model.config.vocab_size == card["vocab_size"]
    # config.json keeps the config switch; the per-module SDPA switch is not saved (load_exported re-applies it)
    assert json.loads((folder / "config.json").read_text())["is_causal"] is False
    assert not is_bidirectional(model)
    for key, value in {
        "bidirectional": True,
        "shift": True,
        "kind": "merged",
        "mask_token": "[MASK]",
    }.items():
        assert card[key] == value, key
    assert card["base_model"] == checkpoint_model.cfg["model"]["pretrained"]
    assert card["sampler"]["gen_length"] == checkpoint_model.sampler_config.gen_length
    assert "### Response:" in card["prompt_template"]["no_input"]


def test_export_root_resolves_to_merged_and_missing_card_is_an_error(exported, tmp_path):
    assert read_card(exported)[0] == exported / "merged"
    with pytest.raises(FileNotFoundError, match="diffllm.json"):
        load_exported(tmp_path)


@pytest.mark.parametrize("kind", ["adapter", "merged"])
def test_card_written_before_model_attention_is_read(checkpoint_model, exported, tmp_path, kind):
    """Cards that say ``prefix_lm: true`` (card and model node) load as model.attention=prefix_lm."""
    import shutil

    folder = tmp_path / kind
    shutil.copytree(exported / kind, folder)
    card = json.loads((folder / "diffllm.json").read_text())
    assert card.pop("attention") == "prefix_lm"
    card["prefix_lm"] = True
    card["model"] = {**{k: v for k, v in card["model"].items() if k != "attention"}, "prefix_lm": True}
    (folder / "diffllm.json").write_text(json.dumps(card))
    with pytest.warns(FutureWarning, match="model.prefix_lm=True is deprecated"):
        reloaded = load_exported(folder)
    assert reloaded.dlm.attention == "prefix_lm"
    ids = probe_batch(checkpoint_model)
    canvas = ids == checkpoint_model.dlm.mask_id
    attention_mask = (ids != checkpoint_model.tokenizer.pad_token_id).long()
    with torch.no_grad():
        got = reloaded.dlm(ids, attention_mask, canvas)
        want = checkpoint_model.dlm(ids, attention_mask, canvas)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train_mask_row", [False, True])
def test_roundtrip_untied_model_with_and_without_a_trained_mask_row(tiny_model_dir, tmp_path, train_mask_row):
    """Untied embeddings (the conftest model); an untrained mean-initialised [MASK] row is rebuilt
    by re-running add_mask_token on the base."""
    model_cfg = {"pretrained": tiny_model_dir, "shift": True, "train_mask_row": train_mask_row}
    dlm, tok = build_diffusion_model(lora=LORA, **model_cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in dlm.model.parameters():
            if p.requires_grad:  # LoRA B starts at 0 and the delta at 0: make both matter
                p.add_(0.1 * torch.randn_like(p))
    cfg = {"model": model_cfg, "lora": LORA, "data": {"template": "short"}, "seed": 0}
    im = InferenceModel(dlm.eval(), tok, SamplerConfig(gen_length=4), cfg=cfg, source="in-memory")
    written = export_model(im, tmp_path, source="in-memory")
    ids = torch.tensor([[1, 5, 6, dlm.mask_id, 7, dlm.mask_id, 2]])
    with torch.no_grad():
        ref = dlm(ids)
    for kind, folder in written.items():
        reloaded = load_exported(folder)
        with torch.no_grad():
            torch.testing.assert_close(reloaded.dlm(ids), ref, atol=1e-5, rtol=1e-5, msg=kind)
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(im, tmp_path, ["adapter"])
