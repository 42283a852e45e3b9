"""Faithful resume at every step, interruption and SLURM requeue, the run folder's logs, numerics and
run folders, end to end on the tiny default (CPU).

The data-order tests are fast; the runs of the diffusion model are ``slow`` (see each docstring).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch.utils.data import DataLoader
from transformers.trainer_pt_utils import LengthGroupedSampler

from diffllm.bench.kill_resume import every_step, kill_and_resume, reference_run
from diffllm.config.resolvers import compose
from diffllm.config.run_folder import RunFolderError, check_run_folder, fresh_dir, write_config
from diffllm.data.order import PassOrder, ResumableLoader, ResumableSampler
from diffllm.training.loggers import ResumableCSVLogger
from diffllm.training.run import train
from diffllm.training.samples import ValidationSamples, write_table
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


# -- the run folder's logs --------------------------------------------------------------------------


def _log(logger: ResumableCSVLogger, rows: list[tuple[int, dict[str, float]]]) -> None:
    for step, metrics in rows:
        logger.log_metrics(metrics, step=step)
    logger.finalize("success")


def _metrics(folder: Path) -> list[dict[str, str]]:
    with open(folder / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_resumed_csv_log_keeps_the_rows_before_its_checkpoint_and_appends(tmp_path):
    """Lightning's CSV writer deleted metrics.csv when a run resumed in its folder. Resumed at
    optimizer step 3 (rows logged under step < 3 belong to it), the file keeps those rows, drops
    the ones the killed run logged after its checkpoint, and takes the new rows (and a new column)."""
    first = ResumableCSVLogger(save_dir=tmp_path, name="logs", version="")
    _log(first, [(s, {"train/loss": 10.0 - s}) for s in range(5)] + [(2, {"val/loss": 7.5})])
    resumed = ResumableCSVLogger(save_dir=tmp_path, name="logs", version="")
    resumed.resume_at(3)
    _log(resumed, [(3, {"train/loss": 6.5}), (3, {"val/loss": 6.0, "val/rougeL": 0.5})])
    rows = _metrics(tmp_path)
    assert [(r["step"], r["train/loss"], r["val/loss"], r["val/rougeL"]) for r in rows] == [
        ("0", "10.0", "", ""),
        ("1", "9.0", "", ""),
        ("2", "8.0", "", ""),
        ("2", "", "7.5", ""),
        ("3", "6.5", "", ""),
        ("3", "", "6.0", "0.5"),
    ]
    fresh = ResumableCSVLogger(save_dir=tmp_path, name="logs", version="")  # not a resume: Lightning's way
    _log(fresh, [(0, {"train/loss": 1.0})])
    assert [(r["step"], r["train/loss"]) for r in _metrics(tmp_path)] == [("0", "1.0")]


def test_the_samples_table_keeps_the_rows_written_before_the_checkpoint(tmp_path):
    """val_samples.csv names the global step of its validation, which cannot tell a validation at
    the end of step G (before its checkpoint) from one in the middle of step G + 1 (after it):
    checkpoints hold the rows written, and a resume keeps that many."""
    logger = ResumableCSVLogger(save_dir=tmp_path, name="logs", version="")
    tables = [
        [{"step": s, "prompt": f"p{i}", "generated": "g", "reference": "r"} for i in range(2)]
        for s in (2, 4, 4)
    ]
    for table in tables:
        write_table([logger], table, table[0]["step"])
    samples = ValidationSamples()
    samples.load_state_dict({"rows_written": 4})  # the checkpoint came after the first two tables
    trainer = SimpleNamespace(is_global_zero=True, loggers=[logger])
    samples.on_train_start(trainer, None)
    with open(tmp_path / "logs" / "val_samples.csv", newline="") as f:
        kept = [(r["step"], r["prompt"]) for r in csv.DictReader(f)]
    assert kept == [("2", "p0"), ("2", "p1"), ("4", "p0"), ("4", "p1")]
    assert samples.state_dict() == {"rows_written": 4}


# -- faithful resume at every step ------------------------------------------------------------------

# 9 steps of the tiny default (diffllm.bench.kill_resume.BASE) on 24 rows: 3 batches per pass and 2
# micro-batches per step, so each pass ends with a one-micro-batch step (steps 2, 4, 6, 8); validation
# every 2 steps = 4 micro-batches: in the middle of step 3's window, at the end of step 5 (mid-pass)
# and at the end of step 8 (a pass end).
STEPS, SWEEP = 9, ["trainer.val_every_n_steps=2", "data.limit_train_rows=24"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 9-step run, checkpointing at the end of every step (about 10 s)."""
    torch.set_num_threads(1)
    return reference_run(STEPS, seed=0, root=tmp_path_factory.mktemp("resume"), extra=SWEEP)


def _all_equal(figures: dict) -> None:
    assert figures["total"] == 33 and figures["equal"] == 33  # every trainable tensor
    assert figures["training_state"]  # AdamW moments and step counts, the LR scheduler
    assert figures["metrics_csv"] and figures["samples_csv"]  # the run folder's logs, row for row
    assert figures["best_score"]  # BestCheckpoint's verdict
    assert figures["end_steps"] == (STEPS, STEPS)


@pytest.mark.slow
def test_a_resume_from_the_end_of_every_step_equals_the_uninterrupted_run(reference):
    """Resumed from each of the 8 step ends (the checkpoint a stop at that step writes), in its run
    folder as it stood then: every pass end, accumulation window and validation of the run lies
    inside some resumed tail, and every kind is a resume point (about 60 s on 2 loaded cores)."""
    validations = [r["step"] for r in _metrics(reference.folder) if r["val/nll_bound"]]
    assert validations == ["2", "4", "7"]  # logged under the steps done before them: see above
    results = every_step(reference, reference.folder.parent)
    assert [r["resumed_from"] for r in results] == list(range(1, STEPS))
    for figures in results:
        _all_equal(figures)


@pytest.mark.slow
def test_sigterm_during_a_pass_end_step_after_validations_resumes_exactly(reference, tmp_path):
    """The issue's case (`bench.resume --steps 12 --kill-at 8`: 0 / 33 equal tensors) has this shape:
    a stop at a pass's last step, after a validation. The stop set Lightning's should_stop, which ran
    one more validation; the checkpoint callback then rewrote last.ckpt after it, and resumed from that
    file at a pass's last batch, Lightning started the next pass one micro-batch late, so every
    accumulation window after it shifted. Now SIGTERM during step 6 stops at the end of step 6 with
    its checkpoint and nothing after; resumed in its folder, the run, its metrics.csv and
    val_samples.csv equal the uninterrupted run's (two runs, about 15 s)."""
    figures = kill_and_resume(reference, 5, tmp_path)
    assert figures["stopped_at"] == 6 and figures["exit_code"] == 143
    assert figures["stop"].path == str(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    _all_equal(figures)
    for key, (uninterrupted, resumed) in figures["metrics"].items():
        assert uninterrupted == resumed, key


@pytest.mark.slow
def test_sigusr1_under_slurm_requeues_and_the_requeued_job_resumes_exactly(reference, tmp_path, monkeypatch):
    """SIGUSR1 (SLURM's warning before the time limit) during step 8, a pass end which a validation follows:
    the stop comes after that validation, writes hpc_ckpt_1.ckpt in the run folder, calls a stub
    `scontrol requeue 4242` and exits 138; the same command in the same folder (the requeued job, no
    ckpt_path) resumes from it and ends equal to the uninterrupted run (two runs, about 15 s)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    figures = kill_and_resume(reference, 7, tmp_path, signum=signal.SIGUSR1)
    assert figures["stopped_at"] == 8 and figures["exit_code"] == 138
    assert figures["stop"].path == str(tmp_path / "killed" / "hpc_ckpt_1.ckpt")
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    _all_equal(figures)


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
