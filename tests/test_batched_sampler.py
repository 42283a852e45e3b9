"""The batched sampler against the per-row sampler it replaced (``tests/sampler_oracle.py``), and
remasking (``sampler.remask``) on hand-built models whose confidence drops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from diffllm.diffusion.sampler import SamplerConfig, generate
from tests.sampler_oracle import generate as per_row_generate
from tests.test_blocks import block_dlm
from tests.test_sampler import tiny_dlm

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[1, 5, 6], [1, 9, 10, 11, 12, 3, 4], [1], [1, 7]]  # four prompt lengths: left padding differs
EOS = 59  # a token the random tiny LLaMA proposes often: EOS fill and truncation really happen


def sweep(caches: tuple[str, ...]) -> list[dict]:
    """Every strategy x commit rule x cache x guidance, the other settings rotated through."""
    configs = []
    rules = ("schedule", "threshold")
    for i, (cache, strategy, rule, cfg) in enumerate(
        itertools.product(caches, ("random", "low_confidence", "margin", "entropy"), rules, (0.0, 1.0))
    ):
        if rule == "threshold" and strategy in ("random", "entropy"):
            continue  # their confidence is not a probability: the schema refuses a threshold
        kw = dict(
            gen_length=8,
            block_length=4,
            strategy=strategy,
            cache=cache,
            cfg_scale=cfg,
            fill_after_eos=i % 2 == 0,
            future_blocks=("visible", "hidden")[i // 2 % 2],
            temperature=(0.0, 1.0, 0.0, 0.7)[i % 4],  # greedy and seeded sampling
            top_k=(None, 20)[i // 3 % 2],
            top_p=(None, 0.9)[i // 5 % 2],
            eos_penalty=(0.0, 0.1)[i // 7 % 2],
        )
        if rule == "schedule":
            kw |= dict(steps=(4, 8)[i // 4 % 2], stop_early=i % 3 != 0)
        else:
            kw |= dict(threshold=(0.05, 0.2)[i % 2])
        configs.append(kw)
    return configs


def steps_of(out) -> list[list[tuple]]:
    return [
        [(s.block, s.canvas, s.committed, s.confidences, s.filled) for s in traj.steps]
        for traj in out.trajectories
    ]


MODELS = {
    "prefix_lm": (lambda shift: tiny_dlm(shift, prefix_lm=True), ("none", "prefix", "dual")),
    "block": (lambda shift: block_dlm(shift, block_size=4), ("none", "block")),
}


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_batched_sampler_equals_the_per_row_sampler(kind, shift):
    build, caches = MODELS[kind]
    dlm = build(shift)
    seen = {"parallel": 0, "filled": 0, "eos": 0, "sampled": 0}
    for kw in sweep(caches):
        config = SamplerConfig(**kw)
        expected = per_row_generate(
            dlm, PROMPTS, config, eos_id=EOS, pad_id=0, seed=3, record_trajectory=True
        )
        got = generate(dlm, PROMPTS, config, eos_id=EOS, pad_id=0, seed=3, record_trajectory=True)
        assert torch.equal(got.canvas, expected.canvas), kw
        assert got.tokens == expected.tokens, kw
        assert (got.nfe, got.steps) == (expected.nfe, expected.steps), kw
        assert steps_of(got) == steps_of(expected), kw  # commit order, confidences, fills, canvases
        steps = [s for traj in got.trajectories for s in traj.steps]
        seen["parallel"] += any(len(s.committed) > 1 for s in steps)
        seen["filled"] += any(s.filled for s in steps)
        seen["eos"] += bool((got.canvas == EOS).any())
        seen["sampled"] += kw["temperature"] > 0 or kw["strategy"] == "random"
    # the sweep really exercises parallel commits, EOS fills, EOS answers and random draws
    assert min(seen.values()) > 0, seen


class RevisingDLM(nn.Module):
    """Mock DiffusionLM on a 4-position canvas: every position proposes token 10 + j with p = 0.9,
    except position 0 once position 1 holds a token: then it prefers 20 (p = 0.8) and gives its
    first proposal 10 only p = 0.2. "Hidden states" are the logits (``lm_head`` is the identity)."""

    vocab, gen = 32, 4

    def __init__(self) -> None:
        super().__init__()
        self.mask_id, self.shift = 31, False
        self.lm_head = nn.Identity()

    @staticmethod
    def row(probs: dict[int, float]) -> torch.Tensor:
        logits = torch.full((RevisingDLM.vocab,), -30.0)
        for token, p in probs.items():
            logits[token] = math.log(p)
        return logits

    def hidden_states(self, input_ids, attention_mask=None, **kwargs):
        batch, length = input_ids.shape
        out = torch.zeros(batch, length, self.vocab)
        canvas = input_ids[:, length - self.gen :]
        for b in range(batch):
            for j in range(self.gen):
                out[b, length - self.gen + j] = self.row({10 + j: 0.9, 0: 0.1})
            if canvas[b, 1] != self.mask_id:
                out[b, length - self.gen] = self.row({20: 0.8, 10: 0.2})
        return out


def test_remasking_hides_again_exactly_the_token_whose_confidence_dropped():
    config = SamplerConfig(gen_length=4, steps=4, remask=True, remask_bound=0.5, remask_steps=2)
    out = generate(RevisingDLM(), [[1, 2]], config, eos_id=30, pad_id=0, record_trajectory=True)
    steps = out.trajectories[0].steps
    # step 0 commits position 0 (ties: lower index); step 1 commits 1, whose logits still saw 1 masked;
    # step 2 sees position 1 filled: position 0's token 10 fell to p = 0.2 < 0.5, hidden again (no
    # other token fell); the schedule's last step commits what is left, position 0 now with 20
    assert [s.committed for s in steps] == [[0], [1], [2], [0, 3]]
    assert [s.remasked for s in steps] == [[], [], [0], []]
    assert steps[2].canvas == [31, 11, 12, 31]
    assert out.canvas[0].tolist() == [20, 11, 12, 13]
    assert out.nfe == 4  # the schedule's last step re-commits it: no extra step needed
    assert out.trajectories[0].commit_step() == {0: 3, 1: 1, 2: 2, 3: 3}  # the last commit counts
    off = generate(RevisingDLM(), [[1, 2]], SamplerConfig(gen_length=4, steps=4), eos_id=30, pad_id=0)
    assert off.canvas[0].tolist() == [10, 11, 12, 13]  # without remasking the first proposal stays


class DoubtingDLM(RevisingDLM):
    """Every [MASK] proposes 10 + j with p = 0.9; every committed token gets p = 0.05 at the next
    step: a sampler that remasks without a cap would never end."""

    def hidden_states(self, input_ids, attention_mask=None, **kwargs):
        batch, length = input_ids.shape
        out = torch.zeros(batch, length, self.vocab)
        for b in range(batch):
            for j in range(self.gen):
                token = int(input_ids[b, length - self.gen + j])
                probs = {10 + j: 0.9, 0: 0.1} if token == self.mask_id else {token: 0.05, 0: 0.95}
                out[b, length - self.gen + j] = self.row(probs)
        return out


def test_remasking_stops_at_the_cap_on_extra_steps():
    # schedule S = 4 one token per step, 2 extra steps: every step hides what earlier steps committed,
    # the steps from the schedule's last one on commit everything left, the block's last step hides nothing
    config = SamplerConfig(gen_length=4, steps=4, remask=True, remask_bound=0.5, remask_steps=2)
    out = generate(DoubtingDLM(), [[1]], config, eos_id=30, pad_id=0, record_trajectory=True)
    steps = out.trajectories[0].steps
    assert out.nfe == 4 + 2
    assert [s.committed for s in steps] == [[0], [1], [0], [1, 2, 3], [0], [1, 2, 3]]
    assert [s.remasked for s in steps] == [[], [0], [1], [0], [1, 2, 3], []]
    assert out.canvas[0].tolist() == [10, 11, 12, 13]
    # threshold (τ 0.95: one token per step): at most n + 1 = 5 steps, and a row only hides what its
    # remaining steps can commit again (one per step)
    config = SamplerConfig(gen_length=4, threshold=0.95, remask=True, remask_bound=0.5, remask_steps=1)
    out = generate(DoubtingDLM(), [[1]], config, eos_id=30, pad_id=0, record_trajectory=True)
    steps = out.trajectories[0].steps
    assert out.nfe == 5
    assert [s.committed for s in steps] == [[0], [1], [0], [2], [3]]
    assert [s.remasked for s in steps] == [[], [0], [], [], []]


def test_remasking_never_touches_a_committed_block_and_keeps_rows_apart():
    dlm = tiny_dlm(shift=True, prefix_lm=True)
    base = dict(gen_length=12, block_length=4, remask=True, remask_bound=0.3, remask_steps=3)
    for extra in (dict(steps=6), dict(threshold=0.2), dict(steps=6, temperature=1.0, fill_after_eos=True)):
        config = SamplerConfig(**base, **extra)
        out = generate(dlm, PROMPTS, config, eos_id=EOS, pad_id=0, seed=5, record_trajectory=True)
        assert not (out.canvas == dlm.mask_id).any()
        remasked = 0
        for row, traj in enumerate(out.trajectories):
            for step in traj.steps:
                lo = 4 * step.block
                assert all(lo <= p < lo + 4 for p in step.committed + step.remasked)
                remasked += len(step.remasked)
                for later in traj.steps:  # a block the sampler has left never changes
                    if later.block > step.block:
                        assert later.canvas[lo : lo + 4] == traj.steps[-1].canvas[lo : lo + 4]
            blocks = [s.block for s in traj.steps]
            cap = 2 + 3 if "steps" in extra else 4 + 3
            assert max(blocks.count(b) for b in set(blocks)) <= cap
            alone = generate(dlm, [PROMPTS[row]], config, eos_id=EOS, pad_id=0, seed=5)
            assert alone.canvas[0].tolist() == out.canvas[row].tolist()
        assert remasked > 0  # the random model's confidences are low: remasking really happened


@pytest.mark.parametrize("shift", [True, False])
def test_remasking_keeps_the_block_cache_exact(shift):
    dlm = block_dlm(shift, block_size=4)
    for extra in (dict(steps=6), dict(threshold=0.2)):
        config = dict(gen_length=12, remask=True, remask_bound=0.3, remask_steps=2, **extra)
        plain = generate(dlm, PROMPTS, SamplerConfig(**config), eos_id=EOS, pad_id=0, seed=1)
        cached = generate(dlm, PROMPTS, SamplerConfig(cache="block", **config), eos_id=EOS, pad_id=0, seed=1)
        assert torch.equal(plain.canvas, cached.canvas)
        assert plain.nfe == cached.nfe > (6 if "steps" in extra else 3)  # remasking added steps


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(remask_bound=0.0), "remask_bound"), (dict(remask_steps=0), "remask_steps")],
)
def test_remask_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(remask=True, **kwargs)
