"""model.attention: one mask builder (padding AND mode AND annealing), its modes, old configs."""

from __future__ import annotations

import itertools
from unittest import mock

import pytest
import torch

from diffllm.diffusion.annealing import AttentionAnnealing
from diffllm.model.attention import attention_mode, attention_of, causal_pattern, may_attend
from diffllm.model.load import build_diffusion_model

LORA = {
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

# tiny models on 2 shared cores: OpenMP threads only add spin-wait overhead (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _spans():
    """(key_ok, canvas) (2, 7): row 0 = 3 prompt + 4 answer; row 1 left-padded by 2, 2 prompt + 3 answer."""
    key_ok = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    canvas = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    return key_ok, canvas


def _expected(mode: str, key_ok, canvas, num_queries: int) -> torch.Tensor:
    """The pattern written out pair by pair, from the definitions in the attention module."""
    batch, num_keys = key_ok.shape
    out = torch.zeros(batch, num_queries, num_keys, dtype=torch.bool)
    offset = num_keys - num_queries  # the queries are the last keys
    for b, i, j in itertools.product(range(batch), range(num_queries), range(num_keys)):
        q = offset + i
        rule = {
            "causal": j <= q,
            "bidirectional": True,
            "prefix_lm": bool(canvas[b, q]) or not bool(canvas[b, j]),
        }[mode]
        out[b, i, j] = bool(key_ok[b, j]) and rule
    return out


@pytest.mark.parametrize("num_queries", [7, 3])  # 3: the last 3 positions over a 4-key KV cache
@pytest.mark.parametrize("mode", ["causal", "bidirectional", "prefix_lm"])
def test_may_attend_is_padding_and_mode_exactly(mode, num_queries):
    key_ok, canvas = _spans()
    got = may_attend(mode, key_ok, canvas, num_queries)
    assert got.shape == (2, num_queries, 7)
    assert torch.equal(got, _expected(mode, key_ok, canvas, num_queries))
    # no canvas: prefix_lm is bidirectional
    if mode == "prefix_lm":
        assert torch.equal(
            may_attend(mode, key_ok, None, num_queries),
            _expected("bidirectional", key_ok, canvas, num_queries),
        )


def test_may_attend_refuses_unknown_modes_and_mismatched_spans():
    key_ok, canvas = _spans()
    with pytest.raises(ValueError, match="model.attention='sideways' is not one of"):
        may_attend("sideways", key_ok, canvas, 7)
    with pytest.raises(ValueError, match="canvas .* and padding mask .* differ"):
        may_attend("prefix_lm", key_ok, canvas[:, :5], 7)


@pytest.mark.parametrize("mode", ["causal", "bidirectional", "prefix_lm"])
def test_annealing_composes_with_every_mode(mode):
    """p = 0: causal AND mode AND padding; p = 1 (annealing over): mode AND padding; between: a p-mix."""
    key_ok, canvas = _spans()
    anneal = AttentionAnnealing(steps=4)
    causal = _expected("causal", key_ok, canvas, 7)
    own = _expected(mode, key_ok, canvas, 7)

    start = anneal.visible(2, 7, 0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(may_attend(mode, key_ok, canvas, 7, extra=start), causal & own)
    assert anneal.visible(2, 7, 4) is None  # over: nothing added
    assert torch.equal(may_attend(mode, key_ok, canvas, 7, extra=None), own)

    big_ok = torch.ones(8, 40, dtype=torch.bool)
    big_canvas = torch.arange(40)[None].expand(8, -1) >= 10
    lo = may_attend(mode, big_ok, big_canvas, 40, extra=causal_pattern(40, 40)[None])
    hi = may_attend(mode, big_ok, big_canvas, 40)
    for step in (1, 2, 3):
        visible = anneal.visible(8, 40, step, generator=torch.Generator().manual_seed(step))
        mixed = may_attend(mode, big_ok, big_canvas, 40, extra=visible)
        assert torch.equal(mixed & ~hi, torch.zeros_like(mixed)), (
            "annealing never adds a pair the mode forbids"
        )
        assert torch.equal(mixed & lo, lo), "the causal part of the mode is always visible"
        between = hi & ~lo
        if between.any():  # bidirectional / prefix_lm: a fraction p of the future pairs
            fraction = mixed[between].float().mean().item()
            assert fraction == pytest.approx(step / 4, abs=0.05), (mode, step, fraction)


def test_keyed_annealing_draws_are_per_row():
    from diffllm.diffusion.keys import DrawKeys

    anneal = AttentionAnnealing(steps=10)
    keys = DrawKeys(seed=3, step=5, rows=[4, 1], global_batch_size=8)
    both = anneal.visible(2, 6, 5, keys=keys)
    alone = anneal.visible(1, 6, 5, keys=DrawKeys(seed=3, step=5, rows=[1], global_batch_size=8))
    assert torch.equal(both[1], alone[0])  # row 1 draws the same in any batch
    assert not torch.equal(both[0], both[1])
    other_step = anneal.visible(2, 6, 6, keys=DrawKeys(seed=3, step=6, rows=[4, 1], global_batch_size=8))
    assert not torch.equal(both, other_step)


def test_old_prefix_lm_key_is_read_with_a_warning():
    with pytest.warns(FutureWarning, match="model.prefix_lm=True is deprecated"):
        assert attention_mode(prefix_lm=True) == "prefix_lm"
    with pytest.warns(FutureWarning, match="model.attention='bidirectional'"):
        assert attention_of({"prefix_lm": False, "shift": True}) == "bidirectional"
    assert attention_of({"attention": "causal"}) == "causal"
    assert attention_mode() == "bidirectional"
    with pytest.raises(ValueError, match="disagree"):
        attention_mode("causal", prefix_lm=True)
    with pytest.raises(ValueError, match="model.attention='prefix'"):
        attention_mode("prefix")


# -- the modes on a real (tiny) model -------------------------------------------------------------
def _dlm(tiny_model_dir: str, impl: str):
    dlm, tok = build_diffusion_model(tiny_model_dir, LORA, attn_implementation=impl, shift=False)
    torch.manual_seed(1)
    for n, p in dlm.model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)  # LoRA on the path under test
    return dlm.eval(), tok


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_each_mode_decides_what_a_logit_depends_on(tiny_model_dir, impl):
    dlm, tok = _dlm(tiny_model_dir, impl)
    ids = torch.tensor([tok.encode("copy the words cat dog red blue")] * 2)  # 8 tokens
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # row 1 right-padded by 2: its answer is "cat dog" (positions 4, 5)
    canvas = (torch.arange(ids.shape[1]) >= 4)[None].expand(2, -1) & mask.bool()
    changed = ids.clone()
    changed[:, 5] = tok.convert_tokens_to_ids("green")  # a later answer token

    def run(attention):
        with torch.no_grad():
            return dlm(ids, mask, canvas, attention=attention), dlm(
                changed, mask, canvas, attention=attention
            )

    a, b = run("causal")
    torch.testing.assert_close(a[:, :5], b[:, :5])  # nothing before position 5 sees it
    assert (a[:, 5] - b[:, 5]).abs().amax(-1).min() > 1e-4

    a, b = run("bidirectional")
    assert (a[:, :5] - b[:, :5]).abs().amax(-1).min() > 1e-4  # every earlier position sees it

    a, b = run("prefix_lm")
    torch.testing.assert_close(a[:, :4], b[:, :4])  # the prompt never sees the answer
    assert (a[:, 4] - b[:, 4]).abs().max() > 1e-4  # an answer position sees a later answer token

    # native causal (2D mask, switches) and the builder's 4D causal pattern agree
    assert dlm.attention_inputs(ids, mask, canvas, "causal") == (mask, True)
    with torch.no_grad():
        native = dlm(ids, mask, canvas, attention="causal")
        built = dlm(ids, mask, canvas, attention="causal", extra_mask=torch.ones(2, 8, 8, dtype=torch.bool))
    real = mask.bool()
    torch.testing.assert_close(native[real], built[real], atol=1e-5, rtol=1e-5)


def test_fast_path_and_refusals(tiny_model_dir):
    dlm, tok = _dlm(tiny_model_dir, "sdpa")
    ids = torch.tensor([tok.encode("copy the words cat dog")])
    mask = torch.ones_like(ids)
    canvas = torch.zeros_like(ids, dtype=torch.bool)
    canvas[:, 3:] = True
    dlm.attention = "prefix_lm"
    assert dlm.attention_inputs(ids, mask, None) == (mask, False)  # no canvas: plain bidirectional
    built, switch = dlm.attention_inputs(ids, mask, canvas)
    assert switch is None and built.shape == (1, 1, 6, 6)
    with pytest.raises(ValueError, match=r"\(B, L\) padding mask"):
        dlm(ids, torch.ones(1, 1, 6, 6, dtype=torch.bool), canvas)
    with pytest.raises(ValueError, match="model.attention=prefix_lm needs a custom 4D"):
        build_diffusion_model(
            tiny_model_dir, LORA, attn_implementation="flash_attention_2", attention="prefix_lm"
        )


# -- validation during annealing ------------------------------------------------------------------
def test_validation_inside_annealing_is_reproducible(tmp_path):
    """Two validation passes at a step inside annealing give equal metrics (the draw uses the
    validation generator), and the draw matters (after annealing the loss differs)."""
    from hydra.utils import instantiate

    from diffllm.config.resolvers import compose
    from diffllm.training.module import DiffusionLitModule

    overrides = ["anneal=linear", "anneal.steps=10", "data.limit_val_rows=8", "data.eval_batch_size=4"]
    cfg = compose(overrides + ["val_likelihood.num_samples=1", f"output_dir={tmp_path}"])
    module = DiffusionLitModule.from_run_config(cfg).eval()
    dm = instantiate(cfg.data, tokenizer=module.tokenizer)
    dm.setup("validate")
    batches = list(dm.val_dataloader())

    def validate(step: int) -> list[float]:
        with mock.patch.object(type(module), "global_step", new=mock.PropertyMock(return_value=step)):
            torch.manual_seed(step + len(calls))  # another global RNG state at every pass
            calls.append(step)
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    module.validation_step(batch, i)
        metrics = [module.val_loss, *module.val_nll.values()]
        values = [float(m.compute()) for m in metrics]
        for m in metrics:
            m.reset()
        return values

    calls: list[int] = []
    first = validate(5)
    assert validate(5) == first
    assert validate(10)[0] != first[0]  # at step 10 annealing is over: the loss sees another pattern


# -- checkpoints and export cards written before model.attention -------------------------------------
def _old_style_model_node(node: dict, prefix_lm: bool) -> dict:
    node = {k: v for k, v in node.items() if k != "attention"}
    return {**node, "prefix_lm": prefix_lm}


@pytest.mark.parametrize(("prefix_lm", "mode"), [(True, "prefix_lm"), (False, "bidirectional")])
def test_old_checkpoint_with_prefix_lm_key_loads_as_its_mode(tiny_run, tmp_path, prefix_lm, mode):
    from diffllm.inference.loading import load_for_inference

    ckpt = torch.load(tiny_run[1], map_location="cpu", weights_only=False)
    cfg = dict(ckpt["hyper_parameters"])  # the module's arguments; old checkpoints held them as `cfg`
    assert cfg["model"]["attention"] == "prefix_lm"
    cfg["model"] = _old_style_model_node(cfg["model"], prefix_lm)
    ckpt["hyper_parameters"] = {"cfg": cfg}
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    with pytest.warns(FutureWarning, match=f"model.prefix_lm={prefix_lm} is deprecated"):
        im = load_for_inference(old)
    assert im.dlm.attention == mode
    # the same weights under the mode the old key named: equal logits where the new key says the same
    new = load_for_inference(tiny_run[1])
    new.dlm.attention = mode
    ids = torch.tensor([im.tokenizer.encode("Reverse: cat dog")])
    canvas = torch.zeros_like(ids, dtype=torch.bool)
    canvas[:, -2:] = True
    with torch.no_grad():
        torch.testing.assert_close(im.dlm(ids, None, canvas), new.dlm(ids, None, canvas))
