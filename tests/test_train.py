"""End to end on CPU: every config composes, a tiny run trains/validates/checkpoints/resumes, sweeps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffllm.config.resolvers import CONF_DIR, compose
from diffllm.config.schema import MODULE_ARGS
from diffllm.training.run import train
from tests.conftest import TINY_RUN as TINY


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    cfg = compose([f"+experiment={experiment}", "output_dir=/tmp/x"])
    assert cfg.lora.target_modules and cfg.model.pretrained
    for group in ("objective", "schedule", "time_sampler", "loss", "anneal", "sampler", "data"):
        assert "_target_" in cfg[group], group


@pytest.mark.parametrize(
    "overrides",
    [
        ["schedule=cosine"],
        ["schedule=loglinear", "time_sampler=antithetic"],
        ["schedule=polynomial", "loss=uniform_hidden"],
        ["anneal=linear"],
        ["sampler=fast"],
        ["logger=many"],
        ["objective=ar"],
    ],
)
def test_config_groups_compose(overrides):
    cfg = compose(overrides + ["output_dir=/tmp/x"])
    assert cfg.model.pretrained


@pytest.mark.slow
def test_tiny_run_trains_checkpoints_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    metrics, objs = train(compose(TINY + [f"output_dir={out}"]))
    for key in ("val/nll_bound", "val/ar_nll", "val/gap", "val/exact_match", "val/rougeL", "train/loss"):
        assert key in metrics, key
    assert metrics["val/gap"] == pytest.approx(metrics["val/nll_bound"] - metrics["val/ar_nll"], abs=1e-5)
    printed = capsys.readouterr().out
    assert "answer NLL (nats/token)" in printed and str(out) in printed
    assert (out / "report.json").exists()
    samples = list(out.glob("logs/**/val_samples.csv"))
    assert samples and "generated" in samples[0].read_text().splitlines()[0]

    # the checkpoint holds the trainable weights and the config, not the frozen base
    ckpt_path = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    module = objs["module"]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable
    assert ckpt["hyper_parameters"]["lora"]["r"] == 8  # the module's arguments, plain
    assert set(ckpt["hyper_parameters"]) == set(MODULE_ARGS)
    assert ckpt["global_step"] == 6

    # resume: continues from step 6 to 9 with the restored adapter weights
    out2 = tmp_path / "resumed"
    metrics2, objs2 = train(
        compose(
            TINY
            + ["trainer.max_steps=9", f"ckpt_path={ckpt_path}", f"output_dir={out2}", "report.enabled=false"]
        )
    )
    assert objs2["trainer"].global_step == 9

    # load_from_checkpoint rebuilds the base from model.pretrained and restores the adapters
    from diffllm.training.module import DiffusionLitModule

    reloaded = DiffusionLitModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    for name, p in module.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(dict(reloaded.named_parameters())[name], p)


@pytest.mark.slow
def test_multirun_sweep_writes_readable_subfolders(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "diffllm.train",
        "-m",
        "+experiment=tiny_sweep",
        "lora.r=2,4",
        f"hydra.sweep.dir={tmp_path}",
        "trainer.enable_progress_bar=false",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    subdirs = sorted(p.name for p in Path(tmp_path).iterdir() if p.is_dir())
    assert "+experiment=tiny_sweep,lora.r=2" in subdirs and "+experiment=tiny_sweep,lora.r=4" in subdirs
    for sub in ("+experiment=tiny_sweep,lora.r=2", "+experiment=tiny_sweep,lora.r=4"):
        assert (tmp_path / sub / "checkpoints" / "last.ckpt").exists()
        assert (tmp_path / sub / "report.json").exists()
