"""Faithful resume, interruption, numerics and run folders, end to end on the tiny default (CPU).

The data-order tests are fast; the runs of the diffusion model are ``slow`` (see each docstring).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader
from transformers.trainer_pt_utils import LengthGroupedSampler

from diffllm.bench.kill_resume import compare
from diffllm.config.resolvers import compose
from diffllm.config.run_folder import RunFolderError, check_run_folder, fresh_dir, write_config
from diffllm.data.order import PassOrder, ResumableLoader, ResumableSampler
from diffllm.training.run import train
from diffllm.training.trainer import NoAcceleratorError
from tests.conftest import TINY_RUN

REPO = Path(__file__).resolve().parents[1]


# -- the data order --------------------------------------------------------------------------------


def test_pass_order_is_the_order_the_loaders_gave_before():
    """Figures measured before the resumable order stay valid: same permutations, epoch by epoch."""
    n, seed = 37, 3
    old = DataLoader(
        list(range(n)), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    old_epochs = [[i for b in old for i in b.tolist()] for _ in range(3)]
    order = PassOrder(n, seed)
    assert [order(p) for p in range(3)] == old_epochs
    assert order(1) == old_epochs[1]  # an earlier pass replays from the seed

    lengths = [(7 * i) % 23 for i in range(n)]
    grouped = LengthGroupedSampler(8, lengths=lengths, generator=torch.Generator().manual_seed(seed))
    old_grouped = [list(grouped) for _ in range(3)]
    order = PassOrder(n, seed, lengths=lengths, group_batch_size=8)
    assert [order(p) for p in range(3)] == old_grouped


def test_a_sampler_started_at_any_batch_continues_the_uninterrupted_order():
    n, b = 21, 4  # 6 batches per pass, the last one short
    full = ResumableSampler(n, b, seed=0)
    stream = [list(full) for _ in range(3)]  # three passes, as the uninterrupted run reads them
    flat = [i for p in stream for i in p]
    assert [sorted(p) for p in stream] == [list(range(n))] * 3 and stream[0] != stream[1]
    starts = [0] + [sum(len(stream[q]) for q in range(p)) for p in (1, 2)]  # row offset of each pass
    for position in (1, 5, 6, 9, 17):
        resumed = ResumableSampler(n, b, seed=0, position=position)
        p, k = divmod(position, 6)
        rest = []
        while resumed.position < 18:
            rest += list(resumed)
        assert rest == flat[starts[p] + k * b :], position


def test_ranks_read_the_single_process_order_interleaved():
    """Rank r of W reads rows r, r + W, ... of the one global order: W ranks x batch B see the
    global batches a single process with batch W x B sees (the draw keys' convention)."""
    n = 40
    single = list(ResumableSampler(n, 8, seed=1))
    ranks = [list(ResumableSampler(n, 4, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert ranks[0] == single[0::2] and ranks[1] == single[1::2]
    lengths = [i % 9 for i in range(n)]
    single = list(ResumableSampler(n, 8, seed=1, lengths=lengths))
    ranks = [list(ResumableSampler(n, 4, seed=1, lengths=lengths, num_replicas=2, rank=r)) for r in (0, 1)]
    assert ranks[0] == single[0::2] and ranks[1] == single[1::2]


def test_the_loader_checkpoints_the_trainers_count_not_its_prefetch():
    sampler = ResumableSampler(20, 4, seed=0)
    consumed = {"n": 0}
    loader = ResumableLoader(list(range(20)), batch_size=4, sampler=sampler, consumed=lambda: consumed["n"])
    it = iter(loader)
    next(it), next(it)  # the model took the first batch; the second is Lightning's prefetch
    consumed["n"] = 1
    state = loader.state_dict()
    assert state == {"position": 1, "batches_per_pass": 5}
    fresh = ResumableLoader(list(range(20)), batch_size=4, sampler=ResumableSampler(20, 4, seed=0))
    fresh.load_state_dict(state)
    assert next(iter(fresh)).tolist() == list(sampler.rank_rows(0)[4:8])
    with pytest.raises(ValueError, match="6 batches per pass, this run 5"):
        fresh.load_state_dict({"position": 3, "batches_per_pass": 6})


# -- faithful resume -------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_by_sigterm_and_resumed_equals_the_uninterrupted_run(tmp_path):
    """SIGTERM (a real one, to this process) after step 3 of 6 with 2 micro-batches per step, LoRA
    dropout on and passes of 5 batches: the run stops after step 4, and a fresh Trainer resumed
    from its last.ckpt ends with every trainable tensor and every validation metric equal to the
    uninterrupted run's (three tiny runs, about 60 s on 2 loaded cores)."""
    figures = compare(steps=6, kill_at=3, seed=0, root=tmp_path, extra=[])
    assert figures["stopped_at"] == 4 and figures["exit_code"] == 143
    assert figures["end_steps"] == (6, 6)
    assert figures["total"] == 33 and figures["equal"] == figures["total"]
    assert "val/nll_bound" in figures["metrics"] and "train/loss" in figures["metrics"]
    for key, (uninterrupted, resumed) in figures["metrics"].items():
        assert uninterrupted == resumed, key


@pytest.mark.slow
def test_sigterm_to_a_training_process_writes_a_checkpoint_and_exits_143(tmp_path):
    """A real `kill -TERM` to `python -m diffllm.train`: exit 143, one line naming the checkpoint,
    and the checkpoint resumes (about 40 s)."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "diffllm.train",
        *TINY_RUN,
        "trainer.max_steps=100000",
        "report.enabled=false",
    ]
    cmd += ["trainer.val_every_n_steps=1000", "callbacks.checkpoint.every_n_train_steps=1"]
    cmd += ["data.limit_train_rows=64", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = run_dir / "checkpoints" / "step=000001.ckpt"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # training runs once its first periodic checkpoint is there
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: SIGTERM at optimizer step") and f"ckpt_path={last}" in line
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert step >= 1
    _, objs = train(
        compose(
            TINY_RUN
            + ["report.enabled=false", "data.limit_train_rows=64", f"trainer.max_steps={step + 1}"]
            + [f"ckpt_path={last}", f"output_dir={run_dir}"]
        )
    )
    assert objs["trainer"].global_step == step + 1


# -- numerics --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_learning_rate_of_1e8_stops_the_run_without_a_non_finite_checkpoint(tmp_path):
    """optimizer.lr=1e8 used to train to NaN and save all-NaN tensors with exit 0 (about 20 s)."""
    from diffllm.training.callbacks import NonFiniteLossError

    out = tmp_path / "run"
    overrides = TINY_RUN + ["optimizer.lr=1e8", "optimizer.warmup_steps=0", "trainer.max_steps=30"]
    overrides += ["callbacks.checkpoint.every_n_train_steps=1", "callbacks.numerics.max_consecutive=3"]
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row had a non-finite loss"):
        train(compose(overrides + ["report.enabled=false", f"output_dir={out}"]))
    saved = sorted((out / "checkpoints").glob("*.ckpt"))
    assert saved
    for path in saved:
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        assert all(t.isfinite().all() for t in state.values()), path.name


# -- run folders -----------------------------------------------------------------------------------


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    """The default run folder: the second of two runs with the same timestamp gets `-1`."""
    import diffllm.config.run_folder as rf

    monkeypatch.chdir(tmp_path)
    base = "outputs/2026-01-01/12-00-00"
    first = fresh_dir(base)
    assert fresh_dir(base) == first  # the same process resolves its own folder again
    monkeypatch.setattr(rf, "_claimed", {})  # another process, same second
    second = fresh_dir(base)
    assert (first, second) == (base, base + "-1") and Path(second).is_dir()
    train_yaml = yaml.safe_load((REPO / "conf" / "train.yaml").read_text())
    assert train_yaml["hydra"]["run"]["dir"].startswith("${fresh_dir:")


def test_a_folder_holding_another_run_is_refused_unless_resuming(tmp_path):
    out = tmp_path / "run"
    write_config(out, {"seed": 0})
    with pytest.raises(RunFolderError, match=r"already holds another run .*ckpt_path=.*last.ckpt"):
        check_run_folder(out, None)
    with pytest.raises(RunFolderError):  # a checkpoint of some other folder is not a resume of this one
        check_run_folder(out, str(tmp_path / "other" / "last.ckpt"))
    check_run_folder(out, str(out / "checkpoints" / "last.ckpt"))  # resuming it
    check_run_folder(out, None, rank=1)  # other ranks share rank 0's folder
    (out / "hpc_ckpt_1.ckpt").touch()  # a requeued SLURM job resumes from Lightning's hpc checkpoint
    check_run_folder(out, None)


class Loaded(Exception):
    pass


def _no_model(*args, **kwargs):
    raise Loaded


def test_train_refuses_a_used_folder_before_loading_anything(tmp_path, monkeypatch):

    out = tmp_path / "run"
    write_config(out, {"seed": 0})
    monkeypatch.setattr("diffllm.training.module.DiffusionLitModule", _no_model)
    with pytest.raises(RunFolderError, match="already holds another run"):
        train(compose(TINY_RUN + [f"output_dir={out}"]))
    assert yaml.safe_load((out / "config.yaml").read_text()) == {"seed": 0}  # untouched


def test_config_yaml_is_written_before_the_model_loads_even_into_a_new_folder(tmp_path, monkeypatch):
    """It used to be saved only if the folder already existed, and after the model loaded."""

    out = tmp_path / "not" / "there" / "yet"
    monkeypatch.setattr("diffllm.training.module.DiffusionLitModule", _no_model)
    with pytest.raises(Loaded):
        train(compose(TINY_RUN + [f"output_dir={out}", "seed=7"]))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["seed"] == 7 and saved["data"]["seed"] == 7  # resolved
    assert saved["model"]["pretrained"].startswith("/")  # ${asset:...} resolved to a path


# -- no GPU ----------------------------------------------------------------------------------------


def test_a_gpu_experiment_on_a_machine_without_one_names_trainer_cpu(tmp_path, monkeypatch):

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("diffllm.training.module.DiffusionLitModule", _no_model)
    with pytest.raises(
        NoAcceleratorError, match=r"^trainer.accelerator=gpu .* add trainer=cpu to the command$"
    ):
        train(compose(["+experiment=alpaca_lora", f"output_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()  # nothing written either


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_the_gpu_experiment_cli_prints_one_line_and_exits_1(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "diffllm.train",
        "+experiment=alpaca_lora",
        f"hydra.run.dir={tmp_path / 'r'}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=os.environ | {})
    assert out.returncode == 1, out.stderr[-2000:]
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: trainer.accelerator=gpu") and lines[-1].endswith(
        "add trainer=cpu to the command"
    )
    assert "Traceback" not in out.stderr
