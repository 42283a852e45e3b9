"""The sampler's per-step callback and the live views built on it (the app's canvas, ``generate live=true``)."""

from __future__ import annotations

import re

import pytest
import torch
from rich.console import Console

from diffllm.config.resolvers import compose
from diffllm.diffusion.sampler import SamplerConfig, generate
from diffllm.diffusion.trajectory import MASK_GLYPH, Trajectory, TrajectoryStep
from diffllm.inference.generation import generate_answers
from diffllm.inference.live import (
    LiveCanvas,
    LiveTerminal,
    canvas_html,
    canvas_text,
    frames_of,
    scale_steps,
    step_colour,
)
from diffllm.inference.loading import load_quietly, newest_checkpoint
from diffllm.inference.stream import stream_answer
from diffllm.model.attention import set_bidirectional
from diffllm.model.dlm import DiffusionLM
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

MASK, EOS = 63, 59
PROMPTS = [[1, 5, 6], [1, 9, 10, 11, 12, 3, 4], [1]]
CONFIGS = {
    "schedule, blocks": dict(gen_length=8, steps=4, block_length=4, temperature=1.0),
    "threshold": dict(gen_length=8, threshold=0.2, block_length=4, temperature=1.0),
    "prefix cache, EOS fill": dict(gen_length=8, steps=8, cache="prefix", fill_after_eos=True),
    "remask": dict(gen_length=8, steps=4, block_length=4, temperature=1.0, remask=True, remask_bound=0.5),
}


def tiny_dlm() -> DiffusionLM:
    model = tiny_llama(64, "sdpa", 0, max_position_embeddings=128, initializer_range=0.2)
    set_bidirectional(model, True)
    return DiffusionLM(model, mask_id=MASK, shift=True, attention="bidirectional")


def sample(dlm, config, **kwargs):
    return generate(dlm, PROMPTS, config, eos_id=EOS, pad_id=0, seed=7, **kwargs)


# ----------------------------------------------------------------------------------- the callback


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_frames_are_the_trajectory_steps_in_order_and_change_nothing(name):
    dlm, config = tiny_dlm(), SamplerConfig(**CONFIGS[name])
    reference = sample(dlm, config, record_trajectory=True)
    frames = []
    out = sample(dlm, config, record_trajectory=True, on_step=frames.append)
    # the callback changes no token, draw or forward pass
    assert torch.equal(out.canvas, reference.canvas) and out.tokens == reference.tokens
    assert (out.nfe, out.steps) == (reference.nfe, reference.steps)
    # one frame before the first step (every answer position [MASK]), then one per step, in order
    assert [f.index for f in frames] == list(range(out.steps + 1))
    assert all(s.canvas == [MASK] * 8 and s.committed == [] and s.block == 0 for s in frames[0].rows)
    for r, traj in enumerate(out.trajectories):
        shown = [f.rows[r] for f in frames[1:] if f.rows[r] is not None]
        assert len(shown) == len(traj.steps) and all(a is b for a, b in zip(shown, traj.steps))
        assert shown == reference.trajectories[r].steps
    # every frame has an entry per row: its record, or None where the row took no part (block full)
    nones = [sum(f.rows[r] is None for f in frames[1:]) for r in range(len(PROMPTS))]
    assert [len(t.steps) + n for t, n in zip(out.trajectories, nones)] == [out.steps] * len(PROMPTS)


def test_a_callback_alone_returns_no_trajectory():
    dlm, config = tiny_dlm(), SamplerConfig(**CONFIGS["threshold"])
    frames = []
    out = sample(dlm, config, on_step=frames.append)
    assert out.trajectories is None and len(frames) == out.steps + 1
    assert torch.equal(out.canvas, sample(dlm, config).canvas)


def test_the_callback_runs_before_the_next_forward_pass():
    dlm, config = tiny_dlm(), SamplerConfig(gen_length=8, steps=4, block_length=4)
    events = []
    inner = dlm.hidden_states

    def spy(*args, **kwargs):
        events.append("forward")
        return inner(*args, **kwargs)

    dlm.hidden_states = spy
    out = sample(dlm, config, on_step=lambda f: events.append(f"frame {f.index}"))
    expected = ["frame 0"]
    for s in range(1, out.steps + 1):
        expected += ["forward", f"frame {s}"]
    assert events == expected


def test_an_exception_in_the_callback_stops_the_sampler_and_restores_training_mode():
    dlm = tiny_dlm().train()
    calls = []

    def stop(frame):
        calls.append(frame.index)
        if frame.index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample(dlm, SamplerConfig(gen_length=8, steps=8), on_step=stop)
    assert calls == [0, 1, 2] and dlm.training


# ----------------------------------------------------------------------------------- the canvas


def _trajectory() -> Trajectory:
    """3 positions, mask 9, EOS 8: position 0 at step 1; EOS at 1 at step 2, which fills 2 with EOS."""
    return Trajectory(
        prompt=[1],
        mask_id=9,
        steps=[
            TrajectoryStep(block=0, canvas=[5, 9, 9], committed=[0], confidences=[0.75]),
            TrajectoryStep(block=0, canvas=[5, 8, 8], committed=[1], confidences=[0.5], filled=[2]),
        ],
    )


WORDS = {5: "<b>", 8: "</s>", 9: "[M]"}


def test_the_canvas_follows_the_frames_and_colours_by_commit_step():
    traj = _trajectory()
    frames = frames_of(traj)
    assert [f.index for f in frames] == [0, 1, 2] and frames[0].rows[0].canvas == [9, 9, 9]
    canvas = LiveCanvas(WORDS.get, 9, 3, eos_id=8, scale=2)
    seen = []
    for frame in frames:
        canvas.update(frame.index, frame.rows[0])
        seen.append([(c.text, c.step, c.new, c.after_eos) for c in canvas.cells()])
    assert seen == [
        [("[MASK]", None, False, False)] * 3,
        [("<b>", 1, True, False), ("[MASK]", None, False, False), ("[MASK]", None, False, False)],
        [("<b>", 1, False, False), ("</s>", 2, True, False), ("</s>", 2, True, True)],
    ]
    html = canvas_html(canvas)
    assert re.search(r'data-frame="2" data-ids="5,8,8"', html)
    assert "&lt;b&gt;" in html and "<b>" not in html  # token text is escaped
    # step 1 of 2 is viridis' first colour, step 2 its last; confidences in the tooltips
    assert f"background:rgb{step_colour(1, 2)}" in html and step_colour(1, 2) == (68, 1, 84)
    assert f"background:rgb{step_colour(2, 2)}" in html and step_colour(2, 2) == (253, 231, 37)
    assert "committed at step 1 (confidence 0.750)" in html and "committed at step 2 (EOS fill)" in html
    assert canvas_text(canvas).plain.splitlines()[1] == "<b> </s> </s>"


def test_the_colour_scale_is_the_step_budget_or_the_latest_step():
    assert scale_steps(SamplerConfig(gen_length=8, steps=4)) == 4
    assert scale_steps(SamplerConfig(gen_length=8, threshold=0.5)) is None
    canvas = LiveCanvas(str, 9, 3, scale=None)
    for frame in frames_of(_trajectory())[:2]:
        canvas.update(frame.index, frame.rows[0])
    assert canvas.scale == 1 and canvas_text(canvas).plain.splitlines()[1] == f"5 {MASK_GLYPH} {MASK_GLYPH}"
    lum = [sum(w * c for w, c in zip((0.2126, 0.7152, 0.0722), step_colour(s, 8))) for s in range(1, 9)]
    assert lum == sorted(lum) and len(set(lum)) == 8  # later steps are brighter, each step its own colour


# ----------------------------------------------------------------------------------- on a trained run


@pytest.fixture(scope="module")
def model(tiny_run):
    return load_quietly(tiny_run[1])


REVERSE = "Reverse these words: lion fish ring house"  # a row of the tiny validation set


def decoded_frames(model, trajectory) -> list[str]:
    """Every frame's canvas as the terminal shows it, rebuilt from the trajectory independently."""
    mask = trajectory.mask_id
    return [
        " ".join(MASK_GLYPH if t == mask else model.tokenizer.decode([t]) for t in frame.rows[0].canvas)
        for frame in frames_of(trajectory)
    ]


def test_the_terminal_view_shows_every_frame_in_order_then_the_answer(model):
    overrides = {"gen_length": 8, "steps": 8}
    config = model.sampler_config.with_overrides(overrides)
    console = Console(record=True, force_terminal=True, width=400, color_system="truecolor")
    with LiveTerminal(model, config, ["1/1 reverse"], console=console) as view:
        rows = generate_answers(model, [REVERSE], sampler_overrides=overrides, on_step=view.on_step)
    reference = generate_answers(model, [REVERSE], sampler_overrides=overrides, trajectory=True)[0]
    assert rows[0]["answer"] == reference["answer"]
    # the live display redraws in place (cursor moves, which the recording drops): split the
    # recording at the label each redraw starts with; the last view is drawn again when it stops
    views = [v.strip("\n") for v in console.export_text().split("1/1 reverse")[1:]]
    views = [v for i, v in enumerate(views) if i == 0 or v != views[i - 1]]
    headers = [v.splitlines()[0] for v in views]
    assert [int(re.match(r"step (\d+)/8 ", h).group(1)) for h in headers] == list(range(len(views)))
    assert [v.splitlines()[1] for v in views] == decoded_frames(model, reference["trajectory"])
    answer = views[-1].splitlines()[1].split(" ")[: len(reference["answer_ids"])]
    assert answer == [model.tokenizer.decode([t]) for t in reference["answer_ids"]]


def test_the_stream_yields_the_frames_then_the_cli_answer(model):
    overrides = {"gen_length": 8, "threshold": 0.5}
    items = list(stream_answer(model, REVERSE, sampler_overrides=overrides))
    *frames, row = items
    reference = generate_answers(model, [REVERSE], sampler_overrides=overrides, trajectory=True)[0]
    assert row["answer"] == reference["answer"] and row["nfe"] == reference["nfe"]
    assert [f.rows[0] for f in frames] == [f.rows[0] for f in frames_of(reference["trajectory"])]
    assert row["seconds"] > 0


def test_generate_live_true_prints_the_last_view_when_not_a_terminal(tiny_run, capsys):
    from diffllm.cli.generate import run

    cfg = compose(
        [f"ckpt_path={tiny_run[1]}", f"prompt={REVERSE}", "live=true", "sampler.gen_length=8"],
        config_name="generate",
    )
    results = run(cfg)
    out = capsys.readouterr().out
    # rich prints a non-terminal's live view once, when it stops: the final canvas, then the answer
    trajectory = generate_answers(
        load_quietly(tiny_run[1]), [REVERSE], sampler_overrides={"gen_length": 8}, trajectory=True
    )[0]["trajectory"]
    assert decoded_frames(load_quietly(tiny_run[1]), trajectory)[-1] in out
    assert out.index("1/1 Reverse") < out.index("diffusion:   " + results[0]["answer"])


def test_generate_answers_hands_each_batch_its_first_row(model):
    instructions = [REVERSE, "Copy these words: red blue", "Sort these words: b a c"]
    overrides = {"gen_length": 8, "steps": 4}
    frames = []
    rows = generate_answers(
        model, instructions, sampler_overrides=overrides, batch_size=2, trajectory=True, on_step=frames.append
    )
    # batch 1 (rows 0-1) then batch 2 (row 2), each from its all-[MASK] frame 0, one frame a step
    groups = [(f.first_row, len(f.rows)) for f in frames]
    first = groups.count((0, 2))
    assert groups == [(0, 2)] * first + [(2, 1)] * (len(frames) - first) and first < len(frames)
    assert [f.index for f in frames] == list(range(first)) + list(range(len(frames) - first))
    for k, row in enumerate(rows):
        shown = [
            f.rows[k - f.first_row]
            for f in frames
            if f.index and f.first_row <= k < f.first_row + len(f.rows)
        ]
        assert [s for s in shown if s is not None] == row["trajectory"].steps


def test_newest_checkpoint_skips_the_ar_sft_baseline(tmp_path):
    import os

    run_dir = tmp_path / "2025-01-01" / "10-00-00"
    for i, name in enumerate(("diffusion", "ar_sft")):  # make train's layout; the AR-SFT one newest
        ckpt = run_dir / name / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
        target = "diffllm.training.objectives." + (
            "ARObjective" if name == "ar_sft" else "DiffusionObjective"
        )
        (run_dir / name / "config.yaml").write_text(f"objective:\n  _target_: {target}\n")
        os.utime(ckpt, (1_000 + i, 1_000 + i))
    assert newest_checkpoint(tmp_path) == run_dir / "diffusion" / "checkpoints" / "last.ckpt"
    assert newest_checkpoint(tmp_path / "2025-01-01" / "10-00-00" / "ar_sft") is None
