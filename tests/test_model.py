"""Conversion: bidirectional attention, the [MASK] row, LoRA on attention only, parameter counts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from diffllm.config.resolvers import compose, to_plain
from diffllm.model.attention import (
    causal_attention,
    custom_attention_mask,
    is_bidirectional,
    set_bidirectional,
)
from diffllm.model.load import (
    ModelLoadError,
    apply_lora,
    build_diffusion_model,
    build_from_config,
    parameter_counts,
    trainable_line,
)
from diffllm.training.run import train

LORA = {
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def attn_impls() -> list[str]:
    impls = ["eager", "sdpa"]
    try:
        import flash_attn  # noqa: F401

        if torch.cuda.is_available():
            impls.append("flash_attention_2")
    except ImportError:
        pass
    return impls


def _perturbed_lora(tiny_model_dir: str, impl: str):
    dlm, tok = build_diffusion_model(tiny_model_dir, LORA, attn_implementation=impl, shift=False)
    torch.manual_seed(1)
    for n, p in dlm.model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)  # a trained-looking adapter, so LoRA is on the path under test
    return dlm.eval(), tok


@pytest.mark.parametrize("impl", attn_impls())
@pytest.mark.parametrize("padded", [False, True])
def test_last_token_changes_first_logit(tiny_model_dir, impl, padded):
    dlm, tok = _perturbed_lora(tiny_model_dir, impl)
    assert is_bidirectional(dlm.model)
    ids = torch.tensor([tok.encode("copy the words cat dog red")])
    if padded:  # batch of 2, the second row right-padded by 3
        other = tok.encode("copy cat")
        row2 = other + [tok.pad_token_id] * (ids.shape[1] - len(other))
        ids = torch.cat([ids, torch.tensor([row2])])
        mask = (ids != tok.pad_token_id).long()
        mask[0] = 1
    else:
        mask = torch.ones_like(ids)
    changed = ids.clone()
    changed[0, -1] = tok.convert_tokens_to_ids("blue")
    with torch.no_grad():
        a, b = dlm(ids, mask), dlm(changed, mask)
        assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4, "position 0 did not see the last token"
        c, d = dlm(ids, mask, attention="causal"), dlm(changed, mask, attention="causal")
        torch.testing.assert_close(c[0, 0], d[0, 0])  # the causal mode really is causal
        with causal_attention(dlm.model):  # and so is the switch on the bare HF model
            e, f = dlm.base(ids, attention_mask=mask).logits, dlm.base(changed, attention_mask=mask).logits
        torch.testing.assert_close(e[0, 0], f[0, 0])
    assert is_bidirectional(dlm.model)


@pytest.mark.parametrize("impl", attn_impls())
def test_padding_does_not_change_real_tokens(tiny_model_dir, impl):
    dlm, tok = _perturbed_lora(tiny_model_dir, impl)
    short = tok.encode("sort the list cat dog")
    long = tok.encode("reverse the words cat dog red blue green")
    pad = len(long) - len(short)
    batch = torch.tensor([long, short + [tok.pad_token_id] * pad])
    mask = torch.tensor([[1] * len(long), [1] * len(short) + [0] * pad])
    with torch.no_grad():
        both = dlm(batch, mask)
        alone = dlm(torch.tensor([short]), torch.ones(1, len(short), dtype=torch.long))
    torch.testing.assert_close(both[1, : len(short)], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", attn_impls())
def test_prefix_lm_prompt_never_sees_the_canvas(tiny_model_dir, impl):
    dlm, tok = _perturbed_lora(tiny_model_dir, impl)
    ids = torch.tensor([tok.encode("copy the words cat dog red blue")] * 2)  # row 1 right-padded by 2
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    canvas = torch.zeros_like(ids, dtype=torch.bool)
    canvas[:, 4:] = True  # "cat dog red blue" is the answer canvas
    canvas &= mask.bool()
    changed = ids.clone()
    changed[:, 5] = tok.convert_tokens_to_ids("green")  # an answer token
    with torch.no_grad():
        full_a, full_b = dlm(ids, mask, canvas), dlm(changed, mask, canvas)
        dlm.attention = "prefix_lm"
        a, b = dlm(ids, mask, canvas), dlm(changed, mask, canvas)
        no_canvas = dlm(ids, mask)  # without canvas_mask= (the AR path) the mask is the plain one
    assert (full_a[:, :4] - full_b[:, :4]).abs().max() > 1e-4  # bidirectional: the prompt sees it
    torch.testing.assert_close(a[:, :4], b[:, :4])  # prefix-LM: the prompt does not
    assert (a[:, 4] - b[:, 4]).abs().max() > 1e-4  # the canvas still sees the canvas after it
    torch.testing.assert_close(no_canvas, full_a)
    # the prompt is computed as with a prompt-only input
    with torch.no_grad():
        prompt_only = dlm(ids[:, :4], mask[:, :4], canvas[:, :4])
    torch.testing.assert_close(a[:, :4], prompt_only, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="extra_mask="):
        dlm(ids, torch.ones(2, 1, ids.shape[1], ids.shape[1], dtype=torch.bool), canvas)


def test_prefix_lm_reaches_flex_as_an_exact_block_mask():
    """flex attention gets the prefix-LM + padding pattern as a BlockMask whose mask_mod is exact.

    (The numerical flex-vs-SDPA check runs in ``diffllm.bench.train`` on a GPU: torch's CPU flex
    compilation is not reliable enough for a test.)
    """
    from torch.nn.attention.flex_attention import BlockMask

    allowed = torch.rand(2, 1, 7, 9, generator=torch.Generator().manual_seed(0)) > 0.5
    bm = custom_attention_mask(allowed, "flex_attention", torch.float32)
    assert isinstance(bm, BlockMask) and bm.shape == (2, 1, 7, 9)
    b, q, kv = torch.meshgrid(torch.arange(2), torch.arange(7), torch.arange(9), indexing="ij")
    torch.testing.assert_close(bm.mask_mod(b, 0, q, kv), allowed[:, 0])
    assert custom_attention_mask(allowed, "sdpa", torch.float32) is allowed


def test_prefix_lm_refuses_kernels_without_custom_masks(tiny_model_dir):
    with pytest.raises(ValueError, match="model.attention=bidirectional"):
        build_diffusion_model(
            tiny_model_dir, LORA, attn_implementation="flash_attention_2", attention="prefix_lm"
        )


def test_mask_token_is_a_new_mean_row(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    old_vocab = base.get_input_embeddings().weight.shape[0]
    dlm, tok = build_diffusion_model(tiny_model_dir, None)
    assert dlm.mask_id == old_vocab == tok.mask_token_id
    assert tok.convert_ids_to_tokens(dlm.mask_id) == "[MASK]"
    emb = dlm.base.get_input_embeddings().weight
    assert emb.shape[0] == old_vocab + 1
    torch.testing.assert_close(emb[:old_vocab], base.get_input_embeddings().weight)
    torch.testing.assert_close(emb[old_vocab], base.get_input_embeddings().weight.mean(0))
    out = dlm.base.get_output_embeddings().weight  # untied here: its new row is the mean too
    torch.testing.assert_close(out[old_vocab], base.get_output_embeddings().weight.mean(0))


def test_mask_token_reuse_keeps_vocab(tiny_model_dir):
    dlm, tok = build_diffusion_model(
        tiny_model_dir, None, mask_token={"mode": "reuse", "token": "<reserved_0>"}
    )
    assert dlm.mask_id == tok.convert_tokens_to_ids("<reserved_0>") == tok.mask_token_id
    assert dlm.base.get_input_embeddings().weight.shape[0] == len(tok)
    for bad in ("<nope>", "<unk>"):
        with pytest.raises(ValueError, match="not a token of this vocabulary"):
            build_diffusion_model(tiny_model_dir, None, mask_token={"mode": "reuse", "token": bad})


def test_lora_only_on_attention_and_frozen_count(tiny_model_dir):
    dlm, tok = build_diffusion_model(tiny_model_dir, LORA)
    cfg = dlm.base.config
    trainable = {n: p for n, p in dlm.model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    for name in trainable:
        assert "lora_" in name and any(f".{m}." in name for m in LORA["target_modules"]), name
    # exact count: r * (in + out) for each adapted projection, every layer
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = LORA["r"] * ((h + h) + (h + kv) + (h + kv) + (h + h))
    assert sum(p.numel() for p in trainable.values()) == per_layer * cfg.num_hidden_layers
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_count = (
        sum(p.numel() for p in base.parameters()) + 2 * cfg.hidden_size
    )  # + the [MASK] row, in and out
    frozen = sum(p.numel() for p in dlm.model.parameters() if not p.requires_grad)
    assert frozen == base_count


def test_train_mask_row_adds_exactly_one_row(tiny_model_dir):
    dlm, _ = build_diffusion_model(tiny_model_dir, LORA, train_mask_row=True)
    plain, _ = build_diffusion_model(tiny_model_dir, LORA)
    t1, _ = parameter_counts(dlm.model)
    t0, _ = parameter_counts(plain.model)
    assert t1 - t0 == dlm.base.config.hidden_size
    extra = [n for n, p in dlm.model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert extra and all("embed_tokens" in n for n in extra)


def test_lora_refuses_mlp_targets(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="not an attention block"):
        apply_lora(base, {**LORA, "target_modules": ["q_proj", "up_proj"]})
    with pytest.raises(ValueError, match="matched no module"):
        apply_lora(base, {**LORA, "target_modules": ["query"]})


def test_set_bidirectional_refuses_models_without_attention_switch():
    with pytest.raises(ValueError, match="no attention module"):
        set_bidirectional(torch.nn.Linear(2, 2))


SEED_LINE = "trainable params: 1,703,936 || all params: 1,237,520,384 || trainable%: 0.1377"


def test_llama_3_2_1b_on_meta_matches_the_seed_figures():
    cfg = compose(["+experiment=alpaca_lora", "dry_run=true", "output_dir=/tmp/unused"])
    metrics, _ = train(cfg)
    assert metrics["trainable_line"] == SEED_LINE
    assert metrics["mask_id"] == 128256
    dlm = build_from_config(to_plain(cfg.model.config), to_plain(cfg.lora))
    assert trainable_line(dlm.model) == SEED_LINE
    assert is_bidirectional(dlm.model)
    assert dlm.base.get_input_embeddings().weight.shape[0] == 128257


def test_dry_run_cli_prints_the_seed_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffllm.train",
            "+experiment=alpaca_lora",
            "dry_run=true",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # composes from any working directory
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert SEED_LINE in out.stdout


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model.pretrained="):
        build_diffusion_model("meta-llama/Llama-3.2-1B", LORA)
    with pytest.raises(ModelLoadError, match="local folder"):
        build_diffusion_model(str(tmp_path), LORA)
