"""Checkpoints that survive: atomic writes, signal stops and SLURM requeue, non-finite steps,
periodic/last/best, each written at the end of its step.

The Lightning tests use a toy regression module (a Linear layer, a few CPU steps), so they run in
about a second each; the end-to-end runs on the diffusion model are in ``test_resume.py``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from torch.utils.data import DataLoader, TensorDataset

from diffllm.training.callbacks import (
    BestCheckpoint,
    Interrupted,
    NonFiniteGuard,
    NonFiniteLossError,
    PeriodicCheckpoint,
    StopOnSignal,
    requeue_checkpoints,
    requeue_slurm_job,
    step_end_order,
)
from diffllm.training.trainer import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    NonFiniteCheckpointError,
    build_trainer,
)


class Toy(L.LightningModule):
    """y = w x + b on fixed data; ``nan_from``: steps from which the loss is NaN."""

    def __init__(
        self,
        nan_from: int | None = None,
        signal_at: tuple[int, int] | None = None,
        signum: int = signal.SIGTERM,
    ) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.nan_from = nan_from
        self.signal_at = signal_at  # (optimizer step, micro-batch index): send `signum` there
        self.signum = signum

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if self.nan_from is not None and self.global_step >= self.nan_from:
            loss = loss * float("nan")
        if self.signal_at == (self.global_step, batch_idx % self.trainer.accumulate_grad_batches):
            os.kill(os.getpid(), self.signum)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log(
            "val/nll_bound", torch.nn.functional.mse_loss(self.layer(x), y) + 1.0 / (1 + self.global_step)
        )

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def _data(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        check_val_every_n_epoch=None,
        default_root_dir=str(tmp_path),
        plugins=[AtomicCheckpointIO()],
    )
    return L.Trainer(callbacks=callbacks, **(defaults | kwargs))


# -- atomic writes ---------------------------------------------------------------------------------


def test_a_write_failing_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # writes part of the file, then the disk is full
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        CheckpointWriteError,
        match=r"could not write checkpoint .*last.ckpt \(No space left on device\); the previous one is intact",
    ):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)

    kept = torch.load(path, weights_only=False)
    assert kept["global_step"] == 1 and torch.equal(kept["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary left behind


def test_the_temporary_file_lives_beside_the_target_and_is_renamed(tmp_path, monkeypatch):
    moves = []
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda src, dst: (moves.append((Path(src), Path(dst))), real_replace(src, dst))
    )
    path = tmp_path / "run" / "step=000002.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    ((src, dst),) = moves
    assert dst == path and src.parent == path.parent and src != path
    assert torch.equal(torch.load(path, weights_only=False)["state_dict"]["w"], torch.ones(2))


def test_non_finite_weights_are_never_written(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(
            NonFiniteCheckpointError, match=r"1 trainable tensor\(s\) hold NaN/inf \(e.g. w\)"
        ):
            io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, bad])}}, path)
    assert torch.equal(torch.load(path, weights_only=False)["state_dict"]["w"], torch.ones(2))


# -- periodic, last, best ---------------------------------------------------------------------------


def test_periodic_every_n_steps_last_current_at_the_end_and_best_by_val_metric(tmp_path):
    ckpts = tmp_path / "checkpoints"
    periodic = PeriodicCheckpoint(dirpath=str(ckpts), every_n_train_steps=4)
    best = BestCheckpoint(dirpath=str(ckpts), monitor="val/nll_bound")
    seen = {}  # optimizer step -> val/nll_bound of the validation after it

    class Record(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            seen[trainer.global_step] = float(trainer.callback_metrics["val/nll_bound"])

    trainer = _trainer(tmp_path, [Record(), periodic, best], max_steps=10, val_check_interval=3)
    trainer.fit(Toy(), train_dataloaders=_data(), val_dataloaders=_data(8))
    assert sorted(p.name for p in ckpts.glob("step=*.ckpt")) == ["step=000004.ckpt", "step=000008.ckpt"]
    # Lightning alone would leave last at step 8 (it writes last at the end only if it never did)
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 10
    assert best.best_model_path == str(ckpts / "best.ckpt") and sorted(seen) == [3, 6, 9]
    best_step = min(seen, key=seen.get)
    assert torch.load(ckpts / "best.ckpt", weights_only=False)["global_step"] == best_step
    assert float(best.best_model_score) == pytest.approx(seen[best_step])


# -- signals ---------------------------------------------------------------------------------------


class Events(L.Callback):
    """Records, in order, the step ends, validations and checkpoint writes of a run."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen.append(("validation", trainer.global_step))


class RecordingIO(AtomicCheckpointIO):
    """``AtomicCheckpointIO`` that also notes each write (file name, step) in ``events``."""

    def __init__(self, events: Events) -> None:
        super().__init__()
        self.events = events

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.events.seen.append((Path(path).name, checkpoint["global_step"]))
        super().save_checkpoint(checkpoint, path, storage_options)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sigterm_stops_at_the_end_of_the_step_with_a_checkpoint_and_nothing_after(tmp_path, accumulate):
    """SIGTERM during step 3 (its first micro-batch): the step completes, last.ckpt holds step 3, and
    the run stops there: no validation, no second last.ckpt (Lightning's should_stop ran one more
    validation and the checkpoint callback rewrote last.ckpt after it)."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    stop, events = StopOnSignal(path=str(path)), Events()
    periodic = PeriodicCheckpoint(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=2)
    trainer = _trainer(
        tmp_path,
        step_end_order([stop, periodic, events]),
        max_steps=50,
        accumulate_grad_batches=accumulate,
        val_check_interval=2 * accumulate,  # every 2 steps
        plugins=[RecordingIO(events)],
    )
    module = Toy(signal_at=(2, 0))
    with pytest.raises(Interrupted) as caught:
        trainer.fit(module, train_dataloaders=_data(), val_dataloaders=_data(8))
    assert caught.value is stop.stopped and trainer.global_step == 3
    assert stop.stopped.exit_code == 128 + signal.SIGTERM == 143
    assert stop.stopped.step == 3 and f"resume with ckpt_path={path}" in str(stop.stopped)
    assert events.seen == [
        ("validation", 2),  # step 2's checkpoints come after its validation
        ("step=000002.ckpt", 2),
        ("last.ckpt", 2),
        ("last.ckpt", 3),  # the stop's, at the end of step 3; nothing after it
    ]
    saved = torch.load(path, weights_only=False)
    assert saved["global_step"] == 3
    assert torch.equal(saved["state_dict"]["layer.weight"], module.layer.weight)
    assert signal.getsignal(signal.SIGTERM) != stop._handle  # the process's own handler is back


def test_a_stop_at_a_validation_step_comes_after_its_validation(tmp_path):
    """SIGTERM during step 2, which a validation follows: the checkpoint is written after that
    validation (a run resumed from a checkpoint taken before it would skip it: Lightning counts it
    as done), and holds BestCheckpoint's verdict on it."""
    events = Events()
    stop = StopOnSignal(path=str(tmp_path / "last.ckpt"))
    best = BestCheckpoint(dirpath=str(tmp_path / "ck"), monitor="val/nll_bound")
    trainer = _trainer(
        tmp_path,
        step_end_order([stop, best, events]),
        max_steps=50,
        val_check_interval=2,
        plugins=[RecordingIO(events)],
    )
    with pytest.raises(Interrupted):
        trainer.fit(Toy(signal_at=(1, 0)), train_dataloaders=_data(), val_dataloaders=_data(8))
    assert events.seen == [("validation", 2), ("best.ckpt", 2), ("last.ckpt", 2)]
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["callbacks"][best.state_key]["best_model_score"] == best.best_model_score


def test_periodic_checkpoints_come_at_the_end_of_the_step_after_its_validation(tmp_path):
    """Lightning's every_n_train_steps saves before the step's validation; PeriodicCheckpoint after
    it, so the checkpoint holds the validation (here BestCheckpoint's state of it)."""
    events = Events()
    periodic = PeriodicCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=2)
    best = BestCheckpoint(dirpath=str(tmp_path / "ck"), monitor="val/nll_bound")
    trainer = _trainer(
        tmp_path,
        step_end_order([periodic, best, events]),
        max_steps=5,
        val_check_interval=4,
        plugins=[RecordingIO(events)],
    )
    trainer.fit(Toy(), train_dataloaders=_data(), val_dataloaders=_data(8))
    assert events.seen == [
        ("step=000002.ckpt", 2),  # no validation at step 2: written at its last batch
        ("last.ckpt", 2),
        ("validation", 4),
        ("best.ckpt", 4),
        ("step=000004.ckpt", 4),
        ("last.ckpt", 4),
        ("last.ckpt", 5),  # the last step's
    ]
    at_4 = torch.load(tmp_path / "ck" / "step=000004.ckpt", weights_only=False)
    assert at_4["callbacks"][best.state_key]["best_model_score"] is not None


def test_step_end_order_puts_the_resume_checkpoints_last():
    stop, periodic, best, events = (
        StopOnSignal(path="x"),
        PeriodicCheckpoint("d", 1),
        BestCheckpoint("d"),
        Events(),
    )
    assert step_end_order([stop, periodic, events, best]) == [events, best, periodic, stop]
    trainer = build_trainer(callbacks=[stop, periodic, events, best], logger=False, enable_progress_bar=False)
    assert trainer.callbacks[-3:] == [best, periodic, stop]  # Lightning keeps that order


def test_no_signal_no_stop(tmp_path):
    stop = StopOnSignal(path=str(tmp_path / "last.ckpt"))
    trainer = _trainer(tmp_path, [stop], max_steps=4)
    trainer.fit(Toy(), train_dataloaders=_data(), val_dataloaders=_data(8))
    assert stop.stopped is None and trainer.global_step == 4 and not (tmp_path / "last.ckpt").exists()


def test_unknown_signal_names_are_refused():
    with pytest.raises(ValueError, match=r"signals=.*'SIGNOPE' is not a signal name"):
        StopOnSignal(path="x", signals=["SIGTERM", "SIGNOPE"])
    with pytest.raises(
        ValueError, match=r"requeue=\['SIGUSR2'\]: SIGUSR2 is not in callbacks.signals.signals"
    ):
        StopOnSignal(path="x", requeue=["SIGUSR2"])


# -- SLURM requeue ---------------------------------------------------------------------------------


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """This process as task 0 of SLURM job 4242 (srun, one task), with a stub ``scontrol`` first on
    PATH that appends its arguments to ``<tmp>/scontrol.log``; yields that log's path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    stub = bin_dir / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "diffllm", "SLURM_PROCID": "0"}
    for key, value in (env | {"SLURM_LOCALID": "0", "SLURM_NODEID": "0"}).items():
        monkeypatch.setenv(key, value)
    for key in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    yield log


def test_sigusr1_writes_a_step_aligned_requeue_checkpoint_and_requeues_the_job(tmp_path, slurm):
    """A real SIGUSR1 mid-accumulation under SLURM: Lightning's own requeue is off (its handler would
    write a checkpoint mid-step); the step completes, hpc_ckpt_1.ckpt in the run folder holds it, rank
    0 runs `scontrol requeue 4242`, and the run exits 138. The requeued job (the same trainer in the
    same folder) resumes from it, and its own requeue writes hpc_ckpt_2."""
    run_dir = tmp_path / "run"
    for n, expected in ((1, 3), (2, 5)):
        stop = StopOnSignal(path=str(run_dir / "checkpoints" / "last.ckpt"))
        trainer = build_trainer(
            callbacks=[stop],
            default_root_dir=str(run_dir),
            max_steps=50,
            accumulate_grad_batches=2,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            plugins=[AtomicCheckpointIO()],
        )
        environment = trainer._accelerator_connector.cluster_environment
        assert isinstance(environment, SLURMEnvironment) and not environment.auto_requeue
        # the 2nd micro-batch of step 3, then (the requeued job, from step 3) of step 5
        module = Toy(signal_at=(expected - 1, 1), signum=signal.SIGUSR1)
        with pytest.raises(Interrupted) as caught:
            trainer.fit(module, train_dataloaders=_data())
        stopped = caught.value
        assert stopped.exit_code == 128 + signal.SIGUSR1 == 138 and stopped.step == expected
        assert stopped.path == str(run_dir / f"hpc_ckpt_{n}.ckpt")
        assert "SLURM job 4242 requeued" in str(stopped)
        saved = torch.load(stopped.path, weights_only=False)
        assert saved["global_step"] == expected
        assert torch.equal(saved["state_dict"]["layer.weight"], module.layer.weight)
    assert slurm.read_text().splitlines() == ["requeue 4242", "requeue 4242"]
    assert requeue_checkpoints(run_dir) == [run_dir / "hpc_ckpt_1.ckpt", run_dir / "hpc_ckpt_2.ckpt"]
    assert not (run_dir / "checkpoints").exists()  # nothing else was written


def test_an_array_task_requeues_as_job_underscore_task(slurm, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue_slurm_job().startswith("SLURM job 77_3 requeued")
    assert slurm.read_text() == "requeue 77_3\n"


def test_off_slurm_nothing_is_requeued(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert requeue_slurm_job() == "not requeued: not a SLURM job (no SLURM_JOB_ID)"


def test_lightnings_own_requeue_is_refused():
    with pytest.raises(ValueError, match=r"SLURMEnvironment\(auto_requeue=True\).*give auto_requeue=False"):
        build_trainer(plugins=[SLURMEnvironment(auto_requeue=True)], logger=False)


# -- numerics --------------------------------------------------------------------------------------


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    """Loss NaN from step 3: steps 3 and 4 are skipped (weights untouched), the third in a row stops."""
    guard = NonFiniteGuard(max_consecutive=3)
    periodic = PeriodicCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=1)
    module = Toy(nan_from=3)
    snapshots = {}

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots[trainer.global_step] = pl_module.layer.weight.detach().clone()

    trainer = _trainer(tmp_path, [guard, Snap(), periodic], max_steps=20)
    with pytest.raises(NonFiniteLossError, match=r"^3 optimizer steps in a row had a non-finite loss"):
        trainer.fit(module, train_dataloaders=_data(), val_dataloaders=_data(8))
    assert guard.skipped == 3 and guard.consecutive == 3
    assert not torch.equal(snapshots[2], snapshots[3])  # steps 1..3 trained (step 3 is the 3rd update)
    assert torch.equal(snapshots[3], snapshots[4]) and torch.equal(snapshots[4], snapshots[5])
    assert module.layer.weight.isfinite().all()
    last = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    assert all(t.isfinite().all() for t in last["state_dict"].values())
    assert last["callbacks"][guard.state_key] == {"skipped": 2, "consecutive": 2}


def test_a_finite_step_resets_the_run_of_non_finite_ones(tmp_path):
    class Flaky(Toy):
        def training_step(self, batch, batch_idx):  # NaN on every other step
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step % 2 else loss

    guard = NonFiniteGuard(max_consecutive=2)
    trainer = _trainer(tmp_path, [guard], max_steps=8)
    trainer.fit(Flaky(), train_dataloaders=_data(), val_dataloaders=_data(8))
    assert trainer.global_step == 8 and guard.skipped == 4 and guard.consecutive == 1  # step 7: NaN
    assert float(trainer.callback_metrics["train/nonfinite_steps"]) == 4.0
