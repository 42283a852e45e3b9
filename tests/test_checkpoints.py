"""Checkpoints that survive: atomic writes, signal stops, non-finite steps, periodic/last/best.

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
from torch.utils.data import DataLoader, TensorDataset

from diffllm.training.callbacks import (
    BestCheckpoint,
    NonFiniteGuard,
    NonFiniteLossError,
    PeriodicCheckpoint,
    StopOnSignal,
)
from diffllm.training.trainer import AtomicCheckpointIO, CheckpointWriteError, NonFiniteCheckpointError


class Toy(L.LightningModule):
    """y = w x + b on fixed data; ``nan_from``: steps from which the loss is NaN."""

    def __init__(self, nan_from: int | None = None, signal_at: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.nan_from = nan_from
        self.signal_at = signal_at  # (optimizer step, micro-batch index): send SIGTERM there

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if self.nan_from is not None and self.global_step >= self.nan_from:
            loss = loss * float("nan")
        if self.signal_at == (self.global_step, batch_idx % self.trainer.accumulate_grad_batches):
            os.kill(os.getpid(), signal.SIGTERM)
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


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sigterm_stops_at_the_next_step_boundary_with_a_checkpoint(tmp_path, accumulate):
    """SIGTERM during step 2 (its first micro-batch): the step completes, last.ckpt holds step 3."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    stop = StopOnSignal(path=str(path))
    trainer = _trainer(tmp_path, [stop], max_steps=50, accumulate_grad_batches=accumulate)
    module = Toy(signal_at=(2, 0))
    trainer.fit(module, train_dataloaders=_data(), val_dataloaders=_data(8))
    assert trainer.global_step == 3 and stop.stopped is not None
    assert stop.stopped.exit_code == 128 + signal.SIGTERM == 143
    assert stop.stopped.step == 3 and "resume with ckpt_path=" in str(stop.stopped)
    saved = torch.load(path, weights_only=False)
    assert saved["global_step"] == 3
    assert torch.equal(saved["state_dict"]["layer.weight"], module.layer.weight)
    assert signal.getsignal(signal.SIGTERM) != stop._handle  # the process's own handler is back


def test_no_signal_no_stop(tmp_path):
    stop = StopOnSignal(path=str(tmp_path / "last.ckpt"))
    trainer = _trainer(tmp_path, [stop], max_steps=4)
    trainer.fit(Toy(), train_dataloaders=_data(), val_dataloaders=_data(8))
    assert stop.stopped is None and trainer.global_step == 4 and not (tmp_path / "last.ckpt").exists()


def test_unknown_signal_name_is_refused():
    with pytest.raises(ValueError, match=r"'SIGNOPE' is not a signal name"):
        StopOnSignal(path="x", signals=["SIGTERM", "SIGNOPE"])


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
