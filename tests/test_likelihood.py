"""Likelihoods: the ELBO estimators against exact enumeration, the shift, and the AR baseline."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaForCausalLM

from diffllm.diffusion.likelihood import ar_nll, elbo_nll, exact_elbo_nll, hidden_set_weight
from diffllm.diffusion.schedule import CosineSchedule, LinearSchedule, LogLinearSchedule
from diffllm.model.attention import is_bidirectional, set_bidirectional
from diffllm.model.dlm import DiffusionLM
from tests.conftest import tiny_llama

NEG = -1e9  # logit of [MASK]: never predicted


# tiny models on 2 shared cores: OpenMP threads only add spin-wait overhead (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


# --- a mock that looks enough like a Hugging Face causal LM for DiffusionLM ------------------


class _MockDecoder(nn.Module):
    is_causal = True  # what set_bidirectional / ar_mode switch

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn  # input_ids (B, L) -> "hidden states" (B, L, V), read as logits

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(last_hidden_state=self.fn(input_ids))


class _MockCausalLM(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.decoder = _MockDecoder(fn)
        self.head = nn.Identity()  # the hidden state already is the logit vector

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


# Two-token answer after one prompt token: x = [p, a, b], a, b in {0, 1, 2}, [MASK] = 3.
# The mock predicts with the exact conditionals of the joint JOINT[a, b]: a hidden token is
# predicted from p(. | the other one) when that one is visible and from its marginal otherwise.
JOINT = torch.tensor([[0.20, 0.05, 0.10], [0.05, 0.25, 0.05], [0.10, 0.05, 0.15]], dtype=torch.float64)
MASK2 = 3


def _joint_logits(input_ids: torch.Tensor) -> torch.Tensor:
    a, b = input_ids[:, 1], input_ids[:, 2]
    p_a = torch.where((b == MASK2)[:, None], JOINT.sum(1).expand(len(b), 3), JOINT[:, b.clamp_max(2)].T)
    p_b = torch.where((a == MASK2)[:, None], JOINT.sum(0).expand(len(a), 3), JOINT[a.clamp_max(2)])
    out = torch.full((input_ids.shape[0], 3, 4), NEG, dtype=torch.float32)
    out[:, 1, :3] = torch.log(p_a / p_a.sum(1, keepdim=True)).float()
    out[:, 2, :3] = torch.log(p_b / p_b.sum(1, keepdim=True)).float()
    return out


def _joint_dlm() -> DiffusionLM:
    return DiffusionLM(_MockCausalLM(_joint_logits), mask_id=MASK2, shift=False)


def _pair_batch(a: int, b: int, rows: int):
    input_ids = torch.tensor([[0, a, b]]).repeat(rows, 1)
    attention_mask = torch.ones_like(input_ids)
    answer_mask = torch.tensor([[False, True, True]]).repeat(rows, 1)
    return input_ids, attention_mask, answer_mask


# Three-token answer after one prompt token, V = 5 ([MASK] = 4): the logits at each position are a
# fixed random function of the position and of the full mask pattern, so every hidden set gives
# different predictions (an arbitrary, not self-consistent model: ELBO > NLL).
MASK3 = 4
_TABLE = torch.randn(4, 16, 5, generator=torch.Generator().manual_seed(0)) * 2.0  # (pos, pattern, V)
_TABLE[..., MASK3] = NEG


def _pattern_logits(input_ids: torch.Tensor) -> torch.Tensor:
    hidden = (input_ids == MASK3).long()  # (B, 4)
    code = (hidden * torch.tensor([1, 2, 4, 8])).sum(1)  # (B,)
    return _TABLE[:, code].transpose(0, 1)  # (B, 4, V)


def _pattern_dlm() -> DiffusionLM:
    return DiffusionLM(_MockCausalLM(_pattern_logits), mask_id=MASK3, shift=False)


X3 = [0, 2, 0, 3]  # prompt token, then the 3-token answer


def _x3_batch(rows: int):
    input_ids = torch.tensor([X3]).repeat(rows, 1)
    answer_mask = torch.tensor([[False, True, True, True]]).repeat(rows, 1)
    return input_ids, torch.ones_like(input_ids), answer_mask


def _hidden_set_ce(x: list[int], subset: tuple[int, ...]) -> float:
    """sum_{i in S} -log p(x_i | x with S hidden) for the pattern mock, straight from its table."""
    code = sum(1 << i for i in subset)
    logp = torch.log_softmax(_TABLE[:, code].double(), dim=-1)
    return -sum(logp[i, x[i]].item() for i in subset)


def _subsets(positions):
    for code in range(1, 2 ** len(positions)):
        yield tuple(p for k, p in enumerate(positions) if code >> k & 1)


def _exact_by_hand(x: list[int]) -> float:
    """sum_S B(|S|, n-|S|+1) CE(S), enumerated here independently of the library."""
    n = 3
    return sum(
        math.factorial(len(s) - 1) * math.factorial(n - len(s)) / math.factorial(n) * _hidden_set_ce(x, s)
        for s in _subsets([1, 2, 3])
    )


def _grid_expectation(x: list[int], schedule, k: int) -> float:
    """E over the masks of the K-point midpoint-grid estimator: only the quadrature error is left."""
    total = 0.0
    for j in range(k):
        t = torch.tensor((j + 0.5) / k, dtype=torch.float64)
        alpha, w = schedule.alpha(t).item(), schedule.weight(t).item()
        for s in _subsets([1, 2, 3]):
            total += w * (1 - alpha) ** len(s) * alpha ** (3 - len(s)) * _hidden_set_ce(x, s)
    return total / k


# --- exact enumeration --------------------------------------------------------------------------


def test_hidden_set_weights():
    # alpha 1 -> 0: Beta(s, n-s+1); they sum, over the sets that contain a given token, to 1
    assert hidden_set_weight(2, 1) == pytest.approx(0.5)
    assert hidden_set_weight(2, 2) == pytest.approx(0.5)
    assert hidden_set_weight(3, 2) == pytest.approx(1 / 6)
    n = 7
    assert sum(math.comb(n - 1, s - 1) * hidden_set_weight(n, s) for s in range(1, n + 1)) == pytest.approx(
        1.0
    )
    # the polynomial branch agrees with the Beta function at the full range
    assert hidden_set_weight(5, 3, 1.0, 1e-300) == pytest.approx(hidden_set_weight(5, 3), rel=1e-12)


def test_exact_elbo_equals_nll_for_a_consistent_model():
    # n = 2: ELBO = 1/2 [-log p(a|b) - log p(b|a) - log p(a) - log p(b)] = -log p(a, b)
    pairs = [(a, b) for a in range(3) for b in range(3)]
    input_ids = torch.tensor([[0, a, b] for a, b in pairs])
    answer_mask = torch.tensor([[False, True, True]] * len(pairs))
    nll, count = exact_elbo_nll(_joint_dlm(), input_ids, torch.ones_like(input_ids), answer_mask)
    expected = torch.tensor([-math.log(JOINT[a, b].item()) for a, b in pairs], dtype=torch.float64)
    assert torch.allclose(nll, expected, atol=1e-6)
    assert count.tolist() == [2] * len(pairs)


def test_exact_elbo_matches_hand_enumeration():
    input_ids, attention_mask, answer_mask = _x3_batch(1)
    nll, _ = exact_elbo_nll(_pattern_dlm(), input_ids, attention_mask, answer_mask)
    assert nll.item() == pytest.approx(_exact_by_hand(X3), rel=1e-6)
    # schedule-invariant: the cosine schedule also runs alpha from 1 to 0
    nll_cos, _ = exact_elbo_nll(_pattern_dlm(), input_ids, attention_mask, answer_mask, CosineSchedule())
    assert nll_cos.item() == pytest.approx(nll.item(), rel=1e-9)


# --- Monte-Carlo estimators ---------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [LinearSchedule(), CosineSchedule()], ids=repr)
def test_stratified_estimator_is_unbiased(schedule):
    """Mean of 10,000 independent K=4 stratified estimates vs the exact ELBO (tolerance 4 s.e.).

    Measured (seeds 0..49, 200 rows each):
      two-token consistent mock, x = (0, 2), exact 2.302585 (= -log 0.10):
        linear mean 2.291075 (s.e. 0.0195), cosine mean 2.294992 (s.e. 0.0134)
      three-token pattern mock, exact 5.374541:
        linear mean 5.319851 (s.e. 0.0408), cosine mean 5.379081 (s.e. 0.0322)
    With 200,000 estimates the gaps shrink to <= 1.2 s.e. (e.g. linear, 3 tokens: 5.374396 +- 0.0116).
    """
    cases = [(_joint_dlm(), _pair_batch(0, 2, 200), -math.log(0.10)), (_pattern_dlm(), _x3_batch(200), None)]
    for dlm, (input_ids, attention_mask, answer_mask), exact in cases:
        if exact is None:
            exact = exact_elbo_nll(dlm, input_ids[:1], attention_mask[:1], answer_mask[:1])[0].item()
        draws = torch.cat(
            [
                elbo_nll(
                    dlm,
                    input_ids,
                    attention_mask,
                    answer_mask,
                    schedule,
                    num_samples=4,
                    method="stratified",
                    seed=s,
                )[0]
                for s in range(50)
            ]
        ).double()
        mean, se = draws.mean().item(), (draws.std() / math.sqrt(draws.numel())).item()
        assert abs(mean - exact) < 4 * se, (mean, se, exact)
        assert se < 0.05  # the test has power: 4 s.e. is < 4 % of the value


def test_grid_quadrature_converges_to_the_exact_value():
    """The grid estimator's mask-expectation -> exact ELBO as K grows, at the midpoint rate 1/K^2."""
    schedule, exact = CosineSchedule(), _exact_by_hand(X3)
    errors = [abs(_grid_expectation(X3, schedule, k) - exact) for k in (1, 2, 4, 8, 16, 32)]
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 2e-3, errors
    for e1, e2 in zip(errors[2:], errors[3:]):  # halving the step divides the error by ~4
        assert 3.5 < e1 / e2 < 4.5, errors


def test_grid_estimator_mean_matches_its_expectation():
    # 2,000 rows of a K = 4 grid estimate: the masks average out to the quadrature value
    schedule = CosineSchedule()
    input_ids, attention_mask, answer_mask = _x3_batch(2000)
    draws, count = elbo_nll(
        _pattern_dlm(), input_ids, attention_mask, answer_mask, schedule, num_samples=4, seed=3
    )
    mean, se = draws.double().mean().item(), (draws.double().std() / math.sqrt(2000)).item()
    assert abs(mean - _grid_expectation(X3, schedule, 4)) < 4 * se
    assert count.tolist() == [3] * 2000


def test_elbo_nll_is_deterministic_under_seed():
    dlm, batch = _pattern_dlm(), _x3_batch(8)
    a = elbo_nll(dlm, *batch, LinearSchedule(), num_samples=3, seed=5)[0]
    b = elbo_nll(dlm, *batch, LinearSchedule(), num_samples=3, seed=5)[0]
    c = elbo_nll(dlm, *batch, LinearSchedule(), num_samples=3, seed=6)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_elbo_nll_refuses_bad_arguments():
    dlm, batch = _pattern_dlm(), _x3_batch(2)
    with pytest.raises(ValueError, match="estimator 'midpoint'"):
        elbo_nll(dlm, *batch, LinearSchedule(), method="midpoint")
    with pytest.raises(ValueError, match="num_samples"):
        elbo_nll(dlm, *batch, LinearSchedule(), num_samples=0)
    with pytest.raises(ValueError, match="answer tokens"):
        exact_elbo_nll(dlm, *batch, max_answer_tokens=2)


def test_loglinear_bound_stops_at_eps():
    # alpha(1) = eps: the integral over a in [eps, 1] drops a sliver of the full bound
    batch = _x3_batch(1)
    full = exact_elbo_nll(_pattern_dlm(), *batch)[0].item()
    cut = exact_elbo_nll(_pattern_dlm(), *batch, LogLinearSchedule(eps=1e-3))[0].item()
    assert cut < full and cut == pytest.approx(full, rel=1e-2)


# --- the shift: the prediction for token i comes from position i - 1 ---------------------------

POS_V = 16


def _position_revealing_logits(input_ids: torch.Tensor) -> torch.Tensor:
    """Position j's logits point at token j + 1 (the next position's id): they reveal j."""
    b, length = input_ids.shape
    out = torch.full((b, length, POS_V), -20.0)
    out[:, torch.arange(length), (torch.arange(length) + 1) % (POS_V - 1)] = 20.0
    out[..., POS_V - 1] = NEG
    return out


def _position_batch():
    input_ids = torch.arange(8).repeat(2, 1)  # token i sits at position i
    answer_mask = torch.zeros(2, 8, dtype=torch.bool)
    answer_mask[:, 3:] = True
    return input_ids, torch.ones_like(input_ids), answer_mask


@pytest.mark.parametrize("shift", [True, False])
def test_shift_reads_the_previous_position(shift):
    dlm = DiffusionLM(_MockCausalLM(_position_revealing_logits), mask_id=POS_V - 1, shift=shift)
    input_ids, attention_mask, answer_mask = _position_batch()
    source = dlm.logits_at(input_ids, answer_mask, attention_mask).argmax(-1) - 1  # the position read
    targets = answer_mask.nonzero()[:, 1]
    assert torch.equal(source, targets - 1 if shift else targets)
    nll, count = elbo_nll(dlm, input_ids, attention_mask, answer_mask, LinearSchedule(), num_samples=4)
    per_token = (nll.sum() / count.sum()).item()
    assert per_token < 1e-6 if shift else per_token > 10.0
    # the AR baseline always reads position i - 1, whatever the diffusion shift
    ar, _ = ar_nll(dlm, input_ids, attention_mask, answer_mask)
    assert ar.max().item() < 1e-6


def test_ar_nll_refuses_an_answer_at_position_zero():
    dlm = DiffusionLM(_MockCausalLM(_position_revealing_logits), mask_id=POS_V - 1)
    input_ids, attention_mask, answer_mask = _position_batch()
    answer_mask[:, 0] = True
    with pytest.raises(ValueError, match="position 0"):
        ar_nll(dlm, input_ids, attention_mask, answer_mask)


# --- ar_nll against the Hugging Face causal-LM loss ------------------------------------------


def _tiny_llama(attn_implementation: str) -> LlamaForCausalLM:
    return tiny_llama(33, attn_implementation)


def _ar_batch():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 32, (3, 10), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # right padding
    attention_mask[2, 8:] = 0
    answer_mask = torch.zeros(3, 10, dtype=torch.bool)
    answer_mask[:, 4:] = True
    answer_mask &= attention_mask.bool()
    labels = torch.where(answer_mask, input_ids, -100)
    return input_ids, attention_mask, answer_mask, labels


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["bidirectional", "bidirectional+lora"])
def test_ar_nll_equals_hf_causal_lm_loss(attn_implementation, variant):
    model = _tiny_llama(attn_implementation)
    reference = copy.deepcopy(model)  # the untouched AR model
    set_bidirectional(model)
    if variant.endswith("lora"):
        lora = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
        model = get_peft_model(model, lora)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.5)  # nonzero B: the adapters change the output
    dlm = DiffusionLM(model, mask_id=32, shift=True).eval()
    input_ids, attention_mask, answer_mask, labels = _ar_batch()

    with torch.no_grad():
        hf_loss = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.item()
        hf_rows = [
            reference(
                input_ids=input_ids[b : b + 1],
                attention_mask=attention_mask[b : b + 1],
                labels=labels[b : b + 1],
            )
            .loss.mul(answer_mask[b].sum())
            .item()
            for b in range(3)
        ]
        converted_before = dlm(input_ids, attention_mask)
        # the converted model really differs from the AR one (bidirectional, and LoRA if any)
        ar_hidden_states = reference.model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        assert not torch.allclose(dlm.hidden_states(input_ids, attention_mask), ar_hidden_states, atol=1e-3)

    nll, count = ar_nll(dlm, input_ids, attention_mask, answer_mask)
    assert count.tolist() == [6, 3, 4]
    assert (nll.sum() / count.sum()).item() == pytest.approx(hf_loss, rel=1e-5)
    assert nll.tolist() == pytest.approx(hf_rows, rel=1e-5)
    # ar_mode restored the diffusion model: bidirectional, adapters on
    assert is_bidirectional(dlm.model)
    with torch.no_grad():
        assert torch.equal(dlm(input_ids, attention_mask), converted_before)


def test_eos_padding_is_in_the_bound_but_not_in_the_token_count():
    # data.answer_pad_to: answer 3 tokens (+ EOS) padded with 3 more EOS; scored: the first 4
    model = _tiny_llama("sdpa")
    set_bidirectional(model)
    dlm = DiffusionLM(model, mask_id=32, shift=True).eval()
    eos = 31
    gen = torch.Generator().manual_seed(3)
    prompt_answer = torch.randint(0, 30, (2, 7), generator=gen)
    prompt_answer[:, 6] = eos
    input_ids = torch.cat([prompt_answer, torch.full((2, 3), eos)], dim=1)  # (2, 10)
    attention_mask = torch.ones_like(input_ids)
    answer_mask = torch.zeros(2, 10, dtype=torch.bool)
    answer_mask[:, 3:] = True
    score_mask = answer_mask.clone()
    score_mask[:, 7:] = False

    padded, count = elbo_nll(
        dlm, input_ids, attention_mask, answer_mask, LinearSchedule(), seed=2, score_mask=score_mask
    )
    joint, joint_count = elbo_nll(dlm, input_ids, attention_mask, answer_mask, LinearSchedule(), seed=2)
    assert count.tolist() == [4, 4] and joint_count.tolist() == [7, 7]
    assert torch.equal(padded, joint)  # the padding's CE stays in the sum: the bound is not loosened
    with pytest.raises(ValueError, match="subset"):
        elbo_nll(dlm, input_ids, attention_mask, score_mask, LinearSchedule(), score_mask=answer_mask)

    # the AR model is scored on the same 4 tokens, as if there were no padding at all
    ar_padded, ar_count = ar_nll(dlm, input_ids, attention_mask, score_mask)
    ar_plain, _ = ar_nll(dlm, input_ids[:, :7], attention_mask[:, :7], score_mask[:, :7])
    assert ar_count.tolist() == [4, 4]
    torch.testing.assert_close(ar_padded, ar_plain)
