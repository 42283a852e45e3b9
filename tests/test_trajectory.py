"""Denoising trajectories: bookkeeping, JSON round trip, terminal rendering."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from diffllm.diffusion.sampler import SamplerConfig, generate
from diffllm.diffusion.trajectory import (
    MASK_GLYPH,
    Trajectory,
    TrajectoryStep,
    trajectories_from_json,
    trajectories_to_json,
)

M = 9  # [MASK] id of the hand-written trajectories


def hand_written() -> Trajectory:
    return Trajectory(
        prompt=[1, 2],
        mask_id=M,
        steps=[
            TrajectoryStep(block=0, canvas=[M, 5, M, M], committed=[1], confidences=[0.75]),
            TrajectoryStep(
                block=0, canvas=[4, 5, 3, 3], committed=[0, 2], confidences=[0.5, 0.25], filled=[3]
            ),
        ],
    )


class Letters:
    """Tokenizer stub: id i decodes to the i-th lowercase letter."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


def test_json_round_trip_is_lossless():
    traj = hand_written()
    text = traj.to_json()
    assert json.loads(text)["steps"][1]["filled"] == [3]
    assert Trajectory.from_json(text) == traj
    many = [traj, Trajectory(prompt=[7], mask_id=M)]
    assert trajectories_from_json(trajectories_to_json(many)) == many


def test_commit_step_maps_every_position_and_rejects_double_commits():
    traj = hand_written()
    assert traj.commit_step() == {1: 0, 0: 1, 2: 1, 3: 1}
    assert traj.final_canvas == [4, 5, 3, 3]
    traj.steps[1].committed.append(1)
    with pytest.raises(ValueError, match="position 1 committed twice"):
        traj.commit_step()
    with pytest.raises(ValueError, match="empty trajectory"):
        _ = Trajectory(prompt=[1], mask_id=M).final_canvas


def test_render_shows_masks_and_marks_new_tokens():
    lines = hand_written().render(Letters()).splitlines()
    assert lines == [
        f"1/2 b0 | {MASK_GLYPH} [f] {MASK_GLYPH} {MASK_GLYPH}",
        "2/2 b0 | [e] f [d] [d]",
    ]
    raw = hand_written().render().splitlines()  # no tokenizer: ids
    assert raw[0].endswith(f"{MASK_GLYPH} [5] {MASK_GLYPH} {MASK_GLYPH}")
    assert all(len(line) <= 12 for line in hand_written().render(width=12).splitlines())


class RampDLM(nn.Module):
    """Mock DiffusionLM: answer position j proposes token j with confidence rising in j."""

    def __init__(self, gen: int, vocab: int = 16) -> None:
        super().__init__()
        self.mask_id, self.shift, self.gen, self.vocab = vocab - 1, False, gen, vocab
        self.lm_head = nn.Identity()

    def hidden_states(self, input_ids, attention_mask=None, **kwargs):
        batch, length = input_ids.shape
        out = torch.zeros(batch, length, self.vocab)
        for j in range(self.gen):
            out[:, length - self.gen + j, j] = math.log(2.0 + j)  # token j, more confident later
        return out


def test_sampler_trajectory_records_the_unmasking_and_round_trips():
    dlm = RampDLM(gen=6)
    out = generate(
        dlm, [[3, 4]], SamplerConfig(gen_length=6, steps=3), eos_id=13, pad_id=14, record_trajectory=True
    )
    (traj,) = out.trajectories
    assert traj.prompt == [3, 4] and traj.mask_id == 15
    assert [s.committed for s in traj.steps] == [[4, 5], [2, 3], [0, 1]]
    assert traj.steps[0].canvas == [15, 15, 15, 15, 4, 5]
    assert traj.steps[0].confidences[0] < traj.steps[0].confidences[1]
    assert traj.final_canvas == out.canvas[0].tolist() == [0, 1, 2, 3, 4, 5]
    lines = traj.render(Letters()).splitlines()
    assert [line.count(MASK_GLYPH) for line in lines] == [4, 2, 0]
    assert Trajectory.from_json(traj.to_json()) == traj
    assert (
        generate(dlm, [[3, 4]], SamplerConfig(gen_length=6, steps=3), eos_id=13, pad_id=14).trajectories
        is None
    )
