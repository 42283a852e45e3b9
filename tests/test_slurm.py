"""SLURM through hydra-submitit-launcher: USR1 before the time limit reaches the run's StopOnSignal
(which requeues; tests/test_checkpoints.py), never submitit's handler; the local executor runs a sweep."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment

from diffllm.config.resolvers import CONF_DIR, register


def test_slurm_launcher_sends_usr1_to_the_run_and_never_requeues_itself(tmp_path, monkeypatch):
    """The sbatch script the launcher would submit, captured before submission (no SLURM here)."""
    register()  # the resolvers and the typed nodes, before Hydra composes
    overrides = ["hydra/launcher=slurm", "trainer=gpu", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train", overrides=overrides + [f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True
        )
    captured = {}

    class CapturingExecutor(submitit.AutoExecutor):
        def map_array(self, fn, *args):
            captured["sbatch"] = self._executor._make_submission_file_text("CMD", "UID")
            captured["max_num_timeout"] = self._executor.max_num_timeout
            return []

    monkeypatch.setattr(submitit, "AutoExecutor", CapturingExecutor)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun found"
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    launcher.launch([["lora.r=8"]], initial_job_idx=0)

    flags = {line for line in captured["sbatch"].splitlines() if line.startswith("#SBATCH")}
    assert "#SBATCH --signal=USR1@120" in flags  # Lightning's handler, not submitit's USR2 one
    assert not any("USR2" in f for f in flags)
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4"} <= flags
    assert captured["max_num_timeout"] == 0
    assert submitit.slurm.slurm.SlurmJobEnvironment.USR_SIG == "USR2"  # so USR1 never reaches submitit
    # Lightning would take USR1 too (its default SLURM environment): build_trainer turns that off
    lightning = SLURMEnvironment()
    assert lightning.auto_requeue and lightning.requeue_signal == signal.SIGUSR1
    signals = cfg.callbacks.signals
    assert "SIGUSR1" in signals.signals and list(signals.requeue) == ["SIGUSR1"]


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "diffllm.train",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "+experiment=tiny_sweep",
        "lora.r=2,4",
        "trainer.max_steps=2",
        "report.enabled=false",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={tmp_path}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for r in (2, 4):
        (job,) = tmp_path.glob(f"+experiment=tiny_sweep,lora.r={r},*")
        assert yaml.safe_load((job / "config.yaml").read_text())["lora"]["r"] == r
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 2
        assert ckpt["hyper_parameters"]["lora"]["r"] == r
    # each job ran in a submitit process of its own, which left its result file
    assert len(list(Path(tmp_path, ".submitit").glob("*/*_result.pkl"))) == 2
