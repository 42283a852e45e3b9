"""Attention-mask annealing over bidirectional attention: causal at step 0, bidirectional at the end,
a p-mix in between (its composition with every mode: tests/test_attention.py)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from transformers import LlamaForCausalLM

from diffllm.config.resolvers import compose
from diffllm.diffusion.annealing import AttentionAnnealing
from diffllm.model.attention import causal_attention, custom_attention_mask, may_attend, set_bidirectional
from tests.conftest import tiny_llama

IMPLS = ["eager", "sdpa"]


# tiny models on 2 shared cores: OpenMP threads only add spin-wait overhead (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _mask(anneal, attention_mask, step, attn_implementation, generator=None):
    """What DiffusionLM passes the decoder for a bidirectional model at ``step`` (the 2D mask once over)."""
    visible = anneal.visible(*attention_mask.shape, step, generator=generator)
    if visible is None:
        return attention_mask
    allowed = may_attend("bidirectional", attention_mask.bool(), None, attention_mask.shape[1], extra=visible)
    return custom_attention_mask(allowed, attn_implementation, torch.float32)


def _bidirectional_llama(attn_implementation: str) -> LlamaForCausalLM:
    return set_bidirectional(tiny_llama(32, attn_implementation))


def _batch(padded: bool):
    input_ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[1, 6:] = 0  # right padding: row 1 has 6 real tokens
    return input_ids, attention_mask


def _logits(model, input_ids, mask):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask).logits


def _change_last_real_token(input_ids, attention_mask):
    changed = input_ids.clone()
    last = attention_mask.sum(1) - 1  # (B,)
    rows = torch.arange(input_ids.shape[0])
    changed[rows, last] = (changed[rows, last] + 1) % 32
    return changed, last


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("attn_implementation", IMPLS)
def test_step_zero_is_causal(attn_implementation, padded):
    model = _bidirectional_llama(attn_implementation)
    input_ids, attention_mask = _batch(padded)
    anneal = AttentionAnnealing(steps=10)
    mask = _mask(anneal, attention_mask, 0, attn_implementation)
    assert mask.shape == (2, 1, 9, 9)

    changed, last = _change_last_real_token(input_ids, attention_mask)
    before, after = _logits(model, input_ids, mask), _logits(model, changed, mask)
    for b in range(2):
        assert torch.equal(before[b, : last[b]], after[b, : last[b]])  # no earlier logit moves
        assert not torch.allclose(before[b, last[b]], after[b, last[b]])

    # and it is exactly the AR model at every real position
    with causal_attention(model):
        causal = _logits(model, input_ids, attention_mask)
    real = attention_mask.bool()
    assert torch.allclose(before[real], causal[real], atol=1e-5)


@pytest.mark.parametrize("attn_implementation", IMPLS)
def test_end_of_annealing_is_bidirectional_and_untouched(attn_implementation):
    model = _bidirectional_llama(attn_implementation)
    input_ids, attention_mask = _batch(padded=True)
    anneal = AttentionAnnealing(steps=10)
    for step in (10, 11, 1000):
        assert anneal.visible(2, 9, step) is None
    for step in (0, 5, 10**6):
        assert AttentionAnnealing(steps=0).visible(2, 9, step) is None

    changed, _ = _change_last_real_token(input_ids, attention_mask)
    before, after = _logits(model, input_ids, attention_mask), _logits(model, changed, attention_mask)
    assert not torch.allclose(before[:, 0], after[:, 0])  # position 0 now sees the last token


@pytest.mark.parametrize("attn_implementation", IMPLS)
def test_in_between_a_fraction_p_of_future_keys_is_visible(attn_implementation):
    batch_size, length = 4, 64
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    attention_mask[1, 50:] = 0
    anneal = AttentionAnnealing(steps=8)
    gen = torch.Generator().manual_seed(0)
    i, j = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    future, past = j > i, j <= i
    for step in (1, 2, 4, 6):
        mask = _mask(anneal, attention_mask, step, attn_implementation, generator=gen)
        allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0  # eager: additive 0 / min
        keys_ok = attention_mask.bool()[:, None, :].expand_as(allowed)
        assert not allowed[~keys_ok].any(), "a padding key is visible"
        assert allowed[past.expand_as(allowed) & keys_ok].all(), "the causal part must stay visible"
        fraction = allowed[future.expand_as(allowed) & keys_ok].float().mean().item()
        # ~7,000 future pairs: the s.d. of the fraction is <= 0.006
        assert fraction == pytest.approx(step / 8, abs=0.03), (step, fraction)


def test_annealed_mask_reaches_eager_and_sdpa_alike():
    input_ids, attention_mask = _batch(padded=True)
    anneal = AttentionAnnealing(steps=2)  # p = 0.5 at step 1
    out = {}
    for impl in IMPLS:
        mask = _mask(anneal, attention_mask, 1, impl, generator=torch.Generator().manual_seed(3))
        out[impl] = _logits(_bidirectional_llama(impl), input_ids, mask)
    real = attention_mask.bool()
    assert torch.allclose(out["eager"][real], out["sdpa"][real], atol=1e-5)
    # a genuine mix: neither the causal nor the bidirectional model
    model = _bidirectional_llama("sdpa")
    bidirectional = _logits(model, input_ids, attention_mask)
    with causal_attention(model):
        causal = _logits(model, input_ids, attention_mask)
    assert not torch.allclose(out["sdpa"][real], bidirectional[real], atol=1e-4)
    assert not torch.allclose(out["sdpa"][real], causal[real], atol=1e-4)


@pytest.mark.parametrize("attn_implementation", IMPLS)
def test_left_padding_gives_finite_logits(attn_implementation):
    input_ids, attention_mask = _batch(padded=False)
    attention_mask[0, :3] = 0  # a padding query at position 0 can see no key: it gets its own
    mask = _mask(AttentionAnnealing(steps=4), attention_mask, 1, attn_implementation)
    assert torch.isfinite(_logits(_bidirectional_llama(attn_implementation), input_ids, mask)).all()


def test_progress_and_refusals():
    anneal = AttentionAnnealing(steps=4)
    assert [anneal.progress(s) for s in (0, 1, 4, 9)] == [0.0, 0.25, 1.0, 1.0]
    assert anneal.active(3) and not anneal.active(4)
    assert not AttentionAnnealing(0).active(0)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        AttentionAnnealing(steps=-1)
    with pytest.raises(ValueError, match="flash_attention_2"):
        _mask(anneal, torch.ones(1, 4), 0, "flash_attention_2")


@pytest.mark.parametrize(("name", "steps"), [("none", 0), ("linear", 200)])
def test_anneal_config_nodes(name, steps):
    anneal = instantiate(compose([f"anneal={name}", "output_dir=/x"]).anneal)  # the node + the option
    assert isinstance(anneal, AttentionAnnealing) and anneal.steps == steps
