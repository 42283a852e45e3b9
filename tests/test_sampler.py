"""The denoising sampler, its strategies and the AR baseline (CPU, hermetic, tiny models)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from diffllm.data.collate import left_pad
from diffllm.diffusion.sampler import SamplerConfig, generate, transfer_schedule
from diffllm.diffusion.strategies import STRATEGIES, TokenSampling, choose_positions, filter_logits
from diffllm.model.ar_generate import ar_generate
from diffllm.model.attention import causal_attention, is_bidirectional, set_bidirectional
from diffllm.model.dlm import DiffusionLM
from tests.conftest import tiny_llama

V, MASK, EOS, PAD = 16, 15, 14, 13  # mock vocabulary
PROMPTS = [[1, 5, 6], [1, 9, 10, 11, 12, 3, 4], [1]]


# tiny models on 2 shared cores: OpenMP threads only add spin-wait overhead (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


class TableDLM(nn.Module):
    """Mock DiffusionLM: answer position j always gets the logits ``table[j]``, whatever the input."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)  # (G, V)
        self.mask_id, self.shift = MASK, False
        self.lm_head = nn.Identity()

    def hidden_states(self, input_ids, attention_mask=None, **kwargs):
        batch, length = input_ids.shape
        gen = self.table.shape[0]
        out = torch.zeros(batch, length, self.table.shape[1])
        out[:, length - gen :] = self.table
        return out  # (B, L, V): "hidden" = logits, lm_head is the identity


def table_from_probs(rows: list[tuple[list[float], int]]) -> torch.Tensor:
    """One logits row per answer position: probabilities ``probs`` laid on tokens first, first+1, ..."""
    table = torch.full((len(rows), V), float("-inf"))
    for j, (probs, first) in enumerate(rows):
        for k, p in enumerate(probs):
            table[j, (first + k) % 13] = math.log(p)  # tokens 0..12: never EOS, PAD or MASK
    return table


def tiny_dlm(
    shift: bool, bidirectional: bool = True, seed: int = 0, attn: str = "sdpa", prefix_lm: bool = False
) -> DiffusionLM:
    """bidirectional=False: a causal model (model.attention=causal); prefix_lm: the prefix-LM mode."""
    # initializer_range 0.2: spread-out logits, no near-ties for the exactness tests
    model = tiny_llama(64, attn, seed, max_position_embeddings=128, initializer_range=0.2)
    set_bidirectional(model, bidirectional)
    attention = "prefix_lm" if prefix_lm else "bidirectional" if bidirectional else "causal"
    return DiffusionLM(model, mask_id=63, shift=shift, attention=attention)


def run(dlm, config: SamplerConfig, prompts=PROMPTS, seed: int = 0, eos_id: int = 59, pad_id: int = 0):
    # 59 is a token the random tiny LLaMA proposes often, so EOS handling really is exercised
    return generate(dlm, prompts, config, eos_id=eos_id, pad_id=pad_id, seed=seed, record_trajectory=True)


# ---------------------------------------------------------------- strategies on known logits

# A: p=(.52,.48)        max .52  margin .04  -H -.692
# B: p=(.55,.40,.05)    max .55  margin .15  -H -.845
# C: p=(.50,.05 x 10)   max .50  margin .45  -H -1.84
ABC = table_from_probs([([0.52, 0.48], 3), ([0.55, 0.40, 0.05], 4), ([0.5] + [0.05] * 10, 5)])
EXPECTED_ORDER = {
    "low_confidence": [1, 0, 2],
    "margin": [2, 1, 0],
    "entropy": [0, 1, 2],
    "left_to_right": [0, 1, 2],
}


@pytest.mark.parametrize("strategy", sorted(EXPECTED_ORDER))
def test_strategy_commits_expected_positions_in_order(strategy):
    out = run(TableDLM(ABC), SamplerConfig(gen_length=3, steps=3, strategy=strategy))
    order = [step.committed for step in out.trajectories[0].steps]
    assert order == [[p] for p in EXPECTED_ORDER[strategy]]
    assert out.canvas[0].tolist() == [3, 4, 5]  # greedy: each position's top token


def test_left_to_right_ignores_confidence_and_takes_the_leftmost_mask_first():
    # the most confident position is the last one: low_confidence decodes right to left here
    table = table_from_probs([([0.3, 0.3, 0.4], 3), ([0.5, 0.5], 4), ([0.7, 0.3], 5), ([0.95, 0.05], 6)])
    by_confidence = run(TableDLM(table), SamplerConfig(gen_length=4, steps=4))
    assert [s.committed for s in by_confidence.trajectories[0].steps] == [[3], [2], [1], [0]]
    two_per_step = run(TableDLM(table), SamplerConfig(gen_length=4, steps=2, strategy="left_to_right"))
    assert [s.committed for s in two_per_step.trajectories[0].steps] == [[0, 1], [2, 3]]
    assert two_per_step.canvas[0].tolist() == by_confidence.canvas[0].tolist() == [5, 4, 5, 6]
    # with a threshold: the leftmost [MASK] and every other one whose probability exceeds tau
    config = SamplerConfig(gen_length=4, strategy="left_to_right", threshold=0.9, steps=None)
    with_tau = run(TableDLM(table), config)
    assert [s.committed for s in with_tau.trajectories[0].steps] == [[0, 3], [1], [2]]
    assert with_tau.canvas[0].tolist() == [5, 4, 5, 6] and with_tau.nfe == 3
    config = SamplerConfig(gen_length=4, strategy="left_to_right", threshold=0.6, steps=None)
    assert [s.committed for s in run(TableDLM(table), config).trajectories[0].steps] == [[0, 2, 3], [1]]


def test_random_strategy_follows_the_rows_generator():
    seed = 7
    gen = torch.Generator().manual_seed(seed)
    left, expected = [0, 1, 2], []
    for _ in range(3):  # one uniform per still-masked position, the largest is committed
        draws = torch.rand(len(left), generator=gen, dtype=torch.float64)
        expected.append([left.pop(int(draws.argmax()))])
    out = run(TableDLM(ABC), SamplerConfig(gen_length=3, steps=3, strategy="random"), seed=seed)
    assert [s.committed for s in out.trajectories[0].steps] == expected
    orders = {
        tuple(
            s.committed[0]
            for s in run(TableDLM(ABC), SamplerConfig(3, 3, strategy="random"), seed=k).trajectories[0].steps
        )
        for k in range(12)
    }
    assert len(orders) > 1  # the order really is random


def test_threshold_commits_exactly_the_positions_above_tau():
    table = table_from_probs([([0.95, 0.05], 1), ([0.5, 0.5], 2), ([0.92, 0.08], 3), ([0.3, 0.7], 4)])
    out = run(TableDLM(table), SamplerConfig(gen_length=4, threshold=0.9))
    steps = out.trajectories[0].steps
    assert [s.committed for s in steps] == [[0, 2], [3], [1]]  # then the single most confident
    assert steps[0].confidences == pytest.approx([0.95, 0.92])
    assert out.steps == out.nfe == 3


def test_choose_positions_ties_threshold_and_counts():
    conf = torch.tensor([0.2, 0.7, 0.7, 0.1], dtype=torch.float64)[None]  # (1, 4)
    every = torch.ones(1, 4, dtype=torch.bool)

    def chosen(candidates=every, **kwargs):
        return choose_positions(conf, candidates, **kwargs)[0].nonzero().squeeze(-1).tolist()

    assert chosen(num=2) == [1, 2]
    assert chosen(num=1) == [1]  # tie -> lower index
    assert chosen(num=9) == [0, 1, 2, 3]
    assert chosen(threshold=0.15) == [0, 1, 2]
    assert chosen(threshold=0.9) == [1]  # none above: the most confident one
    # only candidates count: position 1 is already committed, so the best of the rest is 2, then 0
    assert chosen(torch.tensor([[True, False, True, True]]), num=2) == [0, 2]
    assert chosen(torch.tensor([[True, False, False, True]]), threshold=0.9) == [0]
    assert chosen(torch.zeros(1, 4, dtype=torch.bool), threshold=0.0) == []  # a full block commits nothing
    # a candidate scored -inf still ranks before every position that is no candidate
    low = torch.tensor([[float("-inf"), 0.5, float("-inf")]], dtype=torch.float64)
    only_ends = torch.tensor([[True, False, True]])
    assert choose_positions(low, only_ends, num=1).tolist() == [[True, False, False]]
    assert choose_positions(low, only_ends, threshold=0.9).tolist() == [[True, False, False]]


def test_choose_positions_rows_are_independent():
    conf = torch.tensor([[0.2, 0.7, 0.7, 0.1], [0.9, 0.1, 0.3, 0.95]], dtype=torch.float64)
    candidates = torch.tensor([[True, True, True, True], [True, True, False, True]])
    assert choose_positions(conf, candidates, num=torch.tensor([1, 2])).tolist() == [
        [False, True, False, False],
        [True, False, False, True],
    ]
    assert choose_positions(conf, candidates, threshold=torch.tensor([0.5, 0.92])).tolist() == [
        [False, True, True, False],
        [False, False, False, True],
    ]


def test_strategy_confidences_match_their_formulas():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]))[None]  # (1, 2, 3)
    greedy, everywhere = TokenSampling(), torch.ones(1, 2, dtype=torch.bool)
    conf, tokens = STRATEGIES["low_confidence"](logits, greedy, None, everywhere)
    assert tokens.tolist() == [[0, 2]] and conf.dtype == torch.float64
    assert conf[0].tolist() == pytest.approx([0.6, 0.6])
    assert STRATEGIES["margin"](logits, greedy, None, everywhere)[0][0].tolist() == pytest.approx([0.3, 0.4])
    neg_h = [
        0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1),
        0.4 * math.log(0.2) + 0.6 * math.log(0.6),
    ]
    assert STRATEGIES["entropy"](logits, greedy, None, everywhere)[0][0].tolist() == pytest.approx(neg_h)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, None)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, None, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, None, 0.81)).tolist() == [[False, False, False, True]]
    sampling = TokenSampling(temperature=1.0, top_k=2)
    gen = torch.Generator().manual_seed(0)
    draw_at = torch.ones(1, 200, dtype=torch.bool)
    tokens = STRATEGIES["low_confidence"](logits.expand(1, 200, 4), sampling, [gen], draw_at)[1]
    assert set(tokens.flatten().tolist()) == {0, 1}  # only tokens 0 and 1 are ever drawn, both are


def test_draws_happen_only_where_asked_from_each_rows_generator():
    # row 0 draws at columns 1 and 3, row 1 nowhere: row 0's draws equal one multinomial call on its
    # two columns, and row 1's generator is left untouched
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1))
    draw_at = torch.tensor([[False, True, False, True], [False, False, False, False]])
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    conf, tokens = STRATEGIES["random"](logits, TokenSampling(temperature=1.0), gens, draw_at)
    ref = torch.Generator().manual_seed(7)
    expected_tokens = torch.multinomial(logits[0, [1, 3]].softmax(-1), 1, generator=ref).squeeze(-1)
    expected_conf = torch.rand(2, generator=ref, dtype=torch.float64)
    assert tokens[0, [1, 3]].tolist() == expected_tokens.tolist()
    assert conf[0, [1, 3]].tolist() == expected_conf.tolist()
    assert torch.equal(gens[1].get_state(), torch.Generator().manual_seed(8).get_state())


# ---------------------------------------------------------------- schedule, blocks, EOS handling


def test_transfer_schedule_spreads_evenly():
    assert transfer_schedule(7, 3) == [3, 2, 2]
    assert transfer_schedule(4, 4) == [1, 1, 1, 1]
    assert sum(transfer_schedule(13, 5)) == 13


def test_schedule_counts_per_step():
    table = table_from_probs([([0.5 + 0.01 * j, 0.5 - 0.01 * j], j) for j in range(7)])
    out = run(TableDLM(table), SamplerConfig(gen_length=7, steps=3))
    assert [len(s.committed) for s in out.trajectories[0].steps] == [3, 2, 2]
    assert out.trajectories[0].steps[0].committed == [4, 5, 6]  # the three most confident


def test_block_sampler_never_commits_outside_the_current_block():
    # later positions are MORE confident: a block-free sampler would take them first
    table = table_from_probs([([0.55 + 0.05 * j, 0.45 - 0.05 * j], j) for j in range(8)])
    out = run(TableDLM(table), SamplerConfig(gen_length=8, steps=4, block_length=4))
    steps = out.trajectories[0].steps
    assert [s.committed for s in steps] == [[2, 3], [0, 1], [6, 7], [4, 5]]
    assert [s.block for s in steps] == [0, 0, 1, 1]


@pytest.mark.parametrize("threshold", [None, 0.05])
def test_block_sampler_real_model_stays_in_block(threshold):
    config = SamplerConfig(gen_length=12, block_length=4, steps=None if threshold else 6, threshold=threshold)
    for traj in run(tiny_dlm(shift=True), config).trajectories:
        for step in traj.steps:
            assert all(step.block * 4 <= p < step.block * 4 + 4 for p in step.committed)


def test_eos_penalty_delays_eos():
    table = table_from_probs([([0.6, 0.4], 1), ([0.7, 0.3], 2), ([0.6, 0.4], 3)])
    table[1] = float("-inf")
    table[1, EOS], table[1, 0] = math.log(0.9), math.log(0.1)  # position 1 is confidently EOS
    plain = run(TableDLM(table), SamplerConfig(gen_length=3, steps=3), eos_id=EOS, pad_id=PAD)
    assert plain.trajectories[0].steps[0].committed == [1]
    penalised = run(TableDLM(table), SamplerConfig(3, 3, eos_penalty=1.0), eos_id=EOS, pad_id=PAD)
    assert [s.committed for s in penalised.trajectories[0].steps] == [[0], [2], [1]]
    assert penalised.trajectories[0].steps[-1].confidences == pytest.approx([0.9 - 1.0])
    assert penalised.tokens == [[1]] * len(PROMPTS)  # truncated at EOS, EOS removed


@pytest.mark.parametrize("stop_early", [True, False])
def test_fill_after_eos_and_stop_early(stop_early):
    rows = [([0.6, 0.4], j) for j in range(6)]
    table = table_from_probs(rows)
    table[2] = float("-inf")
    table[2, EOS] = 0.0  # position 2 is EOS with probability 1: committed first
    config = SamplerConfig(gen_length=6, steps=6, fill_after_eos=True, stop_early=stop_early)
    out = run(TableDLM(table), config, eos_id=EOS, pad_id=PAD)
    first = out.trajectories[0].steps[0]
    assert first.committed == [2] and first.filled == [3, 4, 5]
    assert out.canvas[0].tolist() == [0, 1, EOS, EOS, EOS, EOS]
    assert out.tokens == [[0, 1]] * len(PROMPTS)
    assert len(out.trajectories[0].steps) == 3  # only steps with a [MASK] left are recorded
    assert out.steps == out.nfe == (3 if stop_early else 6)


# ---------------------------------------------------------------- end to end on a tiny LLaMA

CONFIGS = {
    "schedule": dict(gen_length=12, steps=6, block_length=4, temperature=1.0, top_k=20),
    "prefix-random-cfg": dict(
        gen_length=12,
        steps=12,
        block_length=6,
        strategy="random",
        temperature=0.8,
        top_p=0.9,
        cache="prefix",
        cfg_scale=1.0,
    ),
    "threshold-fill": dict(
        gen_length=12,
        block_length=4,
        strategy="margin",
        temperature=0.7,
        threshold=0.05,
        cache="prefix",
        fill_after_eos=True,
        eos_penalty=0.1,
    ),
    "entropy-greedy": dict(gen_length=8, steps=8, strategy="entropy"),
    "hidden-future-cache": dict(
        gen_length=12, steps=6, block_length=4, cache="prefix", future_blocks="hidden", fill_after_eos=True
    ),
}


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_invariants(name, shift):
    config = SamplerConfig(**CONFIGS[name])
    out = run(tiny_dlm(shift), config, seed=3)
    assert out.canvas.shape == (len(PROMPTS), config.gen_length)
    assert not (out.canvas == 63).any()
    cfg_factor = 2 if config.cfg_scale > 0 else 1
    assert out.nfe == out.steps * cfg_factor
    if config.threshold is None and not config.fill_after_eos:
        assert out.steps == config.resolved_steps
    else:
        assert config.num_blocks <= out.steps <= config.gen_length
    for row, traj in enumerate(out.trajectories):
        assert traj.final_canvas == out.canvas[row].tolist()
        assert sorted(traj.commit_step()) == list(range(config.gen_length))  # each exactly once
        for before, after in zip(traj.steps, traj.steps[1:]):  # committed tokens never change
            kept = [i for i, t in enumerate(before.canvas) if t != 63]
            assert [after.canvas[i] for i in kept] == [before.canvas[i] for i in kept]
        assert out.tokens[row] == out.canvas[row].tolist()[: len(out.tokens[row])]
        assert 59 not in out.tokens[row]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batch_row_equals_row_alone(name, attn):
    dlm = tiny_dlm(shift=name != "schedule", attn=attn)
    config = SamplerConfig(**CONFIGS[name])
    batch = run(dlm, config, seed=11)
    for row, prompt in enumerate(PROMPTS):
        alone = run(dlm, config, prompts=[prompt], seed=11)
        assert alone.canvas[0].tolist() == batch.canvas[row].tolist()
        assert [s.committed for s in alone.trajectories[0].steps] == [
            s.committed for s in batch.trajectories[row].steps
        ]


def test_seed_determinism_and_greedy_independence():
    dlm = tiny_dlm(shift=True)
    sampled = SamplerConfig(gen_length=12, steps=6, temperature=1.0)
    a, b, c = (run(dlm, sampled, seed=s).canvas for s in (5, 5, 6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = SamplerConfig(gen_length=12, steps=6, temperature=0.0)
    assert torch.equal(run(dlm, greedy, seed=5).canvas, run(dlm, greedy, seed=123).canvas)


class _Spy:
    """Records the input ids and position ids of every decoder call of a DiffusionLM."""

    def __init__(self, dlm: DiffusionLM) -> None:
        self.calls: list[torch.Tensor] = []
        self.position_ids: list[torch.Tensor] = []
        inner = dlm.hidden_states

        def spy(input_ids, attention_mask=None, **kwargs):
            self.calls.append(input_ids.clone())
            self.position_ids.append(kwargs["position_ids"].clone())
            return inner(input_ids, attention_mask, **kwargs)

        dlm.hidden_states = spy


@pytest.mark.parametrize("shift", [True, False])
def test_prefix_cache_runs_only_block_and_suffix(shift):
    dlm = tiny_dlm(shift)
    spy = _Spy(dlm)
    run(dlm, SamplerConfig(gen_length=8, steps=4, block_length=4, cache="prefix"), prompts=[[1, 2, 3]])
    # canvas 3 + 8 = 11; block 0 starts at 3, block 1 at 7; later steps start at lo - shift
    assert [c.shape[1] for c in spy.calls] == [11, 11 - (3 - shift), 11, 11 - (7 - shift)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("shift", [True, False])
def test_prefix_cache_is_exact_for_a_causal_model(shift, attn):
    # with causal attention the prefix KV cannot depend on later tokens: the cache changes nothing
    dlm = tiny_dlm(shift, bidirectional=False, attn=attn)
    for extra in (
        dict(steps=12, block_length=4),
        dict(steps=6, block_length=6, temperature=1.0),
        dict(threshold=0.05, block_length=4),
    ):
        plain = run(dlm, SamplerConfig(gen_length=12, **extra), seed=2)
        cached = run(dlm, SamplerConfig(gen_length=12, cache="prefix", **extra), seed=2)
        assert torch.equal(plain.canvas, cached.canvas)
        assert plain.nfe == cached.nfe


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("shift", [True, False])
def test_prefix_cache_is_exact_for_a_prefix_lm_model(shift, attn):
    # the prompt never attends to the canvas: its cached keys/values are what a full pass computes
    dlm = tiny_dlm(shift, attn=attn, prefix_lm=True)
    for extra in (dict(steps=12), dict(threshold=0.05), dict(steps=6, temperature=1.0, cfg_scale=1.0)):
        plain = run(dlm, SamplerConfig(gen_length=12, **extra), seed=2)
        cached = run(dlm, SamplerConfig(gen_length=12, cache="prefix", **extra), seed=2)
        assert torch.equal(plain.canvas, cached.canvas)
        assert [s.committed for s in plain.trajectories[1].steps] == [
            s.committed for s in cached.trajectories[1].steps
        ]
    # and the mask matters: the same weights without it decode differently
    full = tiny_dlm(shift, attn=attn)
    assert not torch.equal(
        run(full, SamplerConfig(gen_length=12, steps=12), seed=2).canvas,
        run(dlm, SamplerConfig(gen_length=12, steps=12), seed=2).canvas,
    )


@pytest.mark.parametrize("shift", [True, False])
def test_prefix_cache_with_one_step_per_block_equals_uncached(shift):
    dlm = tiny_dlm(shift)
    for gen, block, steps in ((12, 12, 1), (12, 4, 3)):
        plain = run(dlm, SamplerConfig(gen_length=gen, block_length=block, steps=steps), seed=1)
        cached = run(
            dlm, SamplerConfig(gen_length=gen, block_length=block, steps=steps, cache="prefix"), seed=1
        )
        assert torch.equal(plain.canvas, cached.canvas)


@pytest.mark.parametrize("cache", ["none", "prefix"])
@pytest.mark.parametrize("shift", [True, False])
def test_hidden_future_runs_the_canvas_only_up_to_the_current_block(shift, cache):
    dlm = tiny_dlm(shift)
    spy = _Spy(dlm)
    config = SamplerConfig(gen_length=8, steps=4, block_length=4, cache=cache, future_blocks="hidden")
    run(dlm, config, prompts=[[1, 2, 3]])
    # prompt 3: block 0 is [3, 7), block 1 is [7, 11); nothing after the block's end is fed (the
    # visible canvas would be 11 wide from the start); with the cache, later steps of a block start
    # at the block's first source position
    widths = [c.shape[1] for c in spy.calls]
    if cache == "none":
        assert widths == [7, 7, 11, 11]
    else:
        assert widths == [7, 7 - (3 - shift), 11, 11 - (7 - shift)]


@pytest.mark.parametrize("shift", [True, False])
def test_hidden_future_block_is_decoded_as_a_canvas_of_one_block(shift):
    # block 0 of a long canvas with the future hidden == the whole answer of a one-block canvas
    dlm = tiny_dlm(shift)
    short = run(dlm, SamplerConfig(gen_length=4, steps=4), seed=4)
    long_hidden = run(
        dlm, SamplerConfig(gen_length=16, steps=16, block_length=4, future_blocks="hidden"), seed=4
    )
    long_visible = run(dlm, SamplerConfig(gen_length=16, steps=16, block_length=4), seed=4)
    assert torch.equal(long_hidden.canvas[:, :4], short.canvas)
    assert not torch.equal(long_visible.canvas[:, :4], short.canvas)  # the future [MASK]s do matter


def test_hidden_future_changes_nothing_for_a_causal_model():
    dlm = tiny_dlm(shift=True, bidirectional=False)
    for cache in ("none", "prefix"):
        config = dict(gen_length=12, steps=6, block_length=4, cache=cache)
        visible = run(dlm, SamplerConfig(**config), seed=2)
        hidden = run(dlm, SamplerConfig(**config, future_blocks="hidden"), seed=2)
        assert torch.equal(visible.canvas, hidden.canvas)


def test_cfg_runs_an_unconditional_copy_with_the_prompt_masked():
    dlm = tiny_dlm(shift=True)
    spy = _Spy(dlm)
    out = run(dlm, SamplerConfig(gen_length=4, steps=2, cfg_scale=2.0), prompts=[[1, 5, 6], [7]])
    assert out.nfe == 2 * out.steps == 4
    ids = spy.calls[0]  # (2B, P + G): cond rows then uncond rows
    assert ids.shape == (4, 3 + 4)
    assert ids[2, :3].tolist() == [63, 63, 63]  # uncond: prompt -> [MASK]
    assert ids[3, :3].tolist() == [0, 0, 63]  # padding stays padding
    assert torch.equal(ids[:2, 3:], ids[2:, 3:])
    plain = run(dlm, SamplerConfig(gen_length=4, steps=2), prompts=[[1, 5, 6], [7]])
    assert not torch.equal(plain.canvas, out.canvas)  # guidance changes the answer


def test_prompt_is_never_changed_and_left_padding():
    ids, mask = left_pad([[4, 5], [6]], pad_id=0)
    assert ids.tolist() == [[4, 5], [0, 6]] and mask.tolist() == [[1, 1], [0, 1]]
    dlm = tiny_dlm(shift=True)
    spy = _Spy(dlm)
    run(dlm, SamplerConfig(gen_length=6, steps=3), prompts=[[4, 5], [6]])
    assert all(call[:, :2].tolist() == [[4, 5], [0, 6]] for call in spy.calls)
    # positions restart at each row's first real token (RoPE hides a constant offset, other models not)
    assert spy.position_ids[0].tolist() == [list(range(8)), [0] + list(range(7))]


def test_model_training_flag_is_restored():
    dlm = tiny_dlm(shift=True).train()
    run(dlm, SamplerConfig(gen_length=4, steps=2))
    assert dlm.training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(gen_length=10, block_length=4), "divide gen_length=10"),
        (dict(gen_length=12, block_length=4, steps=4), "multiple of 3"),
        (dict(gen_length=8, steps=16), "steps <= 8"),
        (dict(threshold=0.9, steps=64), "set steps=null"),
        (dict(strategy="confidence"), "low_confidence"),
        (dict(cache="kv"), "prefix"),
        (dict(future_blocks="none"), "hidden"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
    ],
)
def test_config_errors_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)


def test_hydra_sampler_configs_build_the_dataclass():
    import dataclasses
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from diffllm.config.resolvers import register

    register()  # conf/sampler/*.yaml name their node, schema/sampler, first

    conf = Path(__file__).resolve().parents[1] / "conf" / "sampler"
    fields = {f.name for f in dataclasses.fields(SamplerConfig)}
    with initialize_config_dir(str(conf), version_base="1.3"):
        default = compose("default")
        assert set(default) - {"_target_"} == fields
        built = {name: instantiate(compose(name)) for name in ("default", "fast", "naive")}
    assert built["default"] == SamplerConfig()
    assert built["fast"].threshold == 0.9 and built["fast"].cache == "prefix"
    assert built["naive"].resolved_steps == built["naive"].gen_length and built["naive"].num_blocks == 1


# ---------------------------------------------------------------- the AR baseline


def _greedy_loop(model, prompt: list[int], max_new: int, eos_id: int) -> list[int]:
    """Reference: argmax of a full (uncached) causal forward, one token at a time."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos_id:
                break
            ids.append(nxt)
            out.append(nxt)
    return out


def test_ar_generate_greedy_matches_hf_and_a_plain_loop():
    dlm = tiny_dlm(shift=True)  # bidirectional: ar_generate must switch it back to causal
    model = dlm.model
    out = ar_generate(model, PROMPTS, max_new_tokens=6, eos_id=2, pad_id=0)
    assert is_bidirectional(model)  # restored
    with causal_attention(model):
        for row, prompt in enumerate(PROMPTS):
            assert out.tokens[row] == _greedy_loop(model, prompt, 6, eos_id=2)
            hf = model.generate(
                torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=0
            )
            hf_tokens = hf[0, len(prompt) :].tolist()
            assert out.tokens[row] == (hf_tokens[: hf_tokens.index(2)] if 2 in hf_tokens else hf_tokens)
    ran = [min(len(t) + 1, 6) for t in out.tokens]  # tokens + EOS, capped at max_new_tokens
    assert out.nfe == max(ran)  # one prefill + one cached pass per further token


def test_ar_generate_turns_lora_off():
    from peft import LoraConfig, get_peft_model

    base = tiny_dlm(shift=True, bidirectional=False).model
    reference = copy.deepcopy(base)
    peft = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    set_bidirectional(peft)
    out = ar_generate(peft, PROMPTS, max_new_tokens=6, eos_id=2, pad_id=0)
    expected = ar_generate(reference, PROMPTS, max_new_tokens=6, eos_id=2, pad_id=0)
    assert out.tokens == expected.tokens
    with causal_attention(peft):  # adapters on: the output really would differ
        assert [_greedy_loop(peft, p, 6, 2) for p in PROMPTS] != expected.tokens
    assert is_bidirectional(peft)


def test_ar_generate_sampling_seeded_and_mask_suppressed():
    dlm = tiny_dlm(shift=True)
    with torch.no_grad():
        dlm.lm_head.weight[63] = 50.0 * dlm.lm_head.weight[:63].mean(0)  # make [MASK] tempting
    state = torch.get_rng_state()
    a = ar_generate(dlm, PROMPTS, max_new_tokens=6, eos_id=2, pad_id=0, temperature=1.0, seed=4)
    b = ar_generate(dlm, PROMPTS, max_new_tokens=6, eos_id=2, pad_id=0, temperature=1.0, seed=4)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    assert a.tokens == b.tokens
    assert all(63 not in t for t in a.tokens)
    batch = ar_generate(dlm, PROMPTS, max_new_tokens=6, eos_id=2, pad_id=0)
    assert batch.tokens == [
        ar_generate(dlm, [p], max_new_tokens=6, eos_id=2, pad_id=0).tokens[0] for p in PROMPTS
    ]


def test_pad_id_none_falls_back_to_eos():
    dlm = tiny_dlm(shift=True)
    config = SamplerConfig(gen_length=6, steps=3)
    a = generate(dlm, PROMPTS, config, eos_id=59, pad_id=None)
    b = generate(dlm, PROMPTS, config, eos_id=59, pad_id=0)
    assert torch.equal(a.canvas, b.canvas)
    assert ar_generate(dlm, PROMPTS, max_new_tokens=4, eos_id=2, pad_id=None).tokens == (
        ar_generate(dlm, PROMPTS, max_new_tokens=4, eos_id=2, pad_id=0).tokens
    )
