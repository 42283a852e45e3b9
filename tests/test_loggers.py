"""conf/logger/*: every logger config instantiates offline; the validation samples table reaches
each logger in the form it takes (CSV file, TensorBoard text, W&B table)."""

from __future__ import annotations

import csv
import importlib.util
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger

from diffllm.config.resolvers import CONF_DIR, compose
from diffllm.training.loggers import ResumableCSVLogger
from diffllm.training.samples import write_table

ROWS = [
    {"step": 3, "prompt": "### Instruction:\nCopy: a | b\n", "generated": "a | b", "reference": "a | b"},
    {"step": 3, "prompt": "### Instruction:\nWhat is 2 + 3?\n", "generated": "6", "reference": "5"},
]
# csv: Lightning's CSVLogger whose metrics.csv survives a resume (diffllm.training.loggers)
EXPECTED = {
    "csv": [ResumableCSVLogger],
    "tensorboard": [TensorBoardLogger],
    "many": [ResumableCSVLogger, TensorBoardLogger],
}


def loggers_of(name: str, out) -> list:
    cfg = compose([f"logger={name}", f"output_dir={out}"])
    return [instantiate(node) for node in cfg.logger.values()]


def test_every_logger_config_is_covered():
    assert {p.stem for p in (CONF_DIR / "logger").glob("*.yaml")} == {*EXPECTED, "wandb"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_logger_configs_instantiate_offline_into_the_run_folder(name, tmp_path):
    loggers = loggers_of(name, tmp_path)
    assert [type(lg) for lg in loggers] == EXPECTED[name]
    for lg in loggers:
        lg.log_metrics({"val/nll_bound": 1.5}, step=0)
        lg.finalize("success")
        assert str(tmp_path) in str(lg.log_dir)
    if name in ("tensorboard", "many"):
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    if name in ("csv", "many"):
        assert "val/nll_bound" in (tmp_path / "logs" / "metrics.csv").read_text()


def test_wandb_config_instantiates_offline(tmp_path, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    (lg,) = loggers_of("wandb", tmp_path)
    assert type(lg).__name__ == "WandbLogger" and lg._offline


def test_samples_table_goes_to_csv_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    csv_logger, tb_logger = loggers_of("many", tmp_path)
    write_table([csv_logger, tb_logger], ROWS, step=3)
    write_table([csv_logger, tb_logger], [{**r, "step": 6} for r in ROWS], step=6)
    tb_logger.experiment.flush()

    with open(tmp_path / "logs" / "val_samples.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["step"] for r in table] == ["3", "3", "6", "6"]  # one header, rows appended per validation
    assert table[0]["generated"] == "a | b" and table[1]["prompt"] == ROWS[1]["prompt"]

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = events.Tensors("val/samples/text_summary")
    assert [t.step for t in texts] == [3, 6]
    shown = texts[0].tensor_proto.string_val[0].decode()
    assert "| prompt | generated | reference |" in shown and "'6'" in shown


def test_samples_table_goes_to_a_wandb_style_logger():
    calls = []
    wandb_like = SimpleNamespace(log_text=lambda **kw: calls.append(kw))
    write_table([wandb_like], ROWS, step=0)
    (call,) = calls
    assert call["key"] == "val/samples" and call["columns"] == ["step", "prompt", "generated", "reference"]
    assert call["data"][1] == [3, ROWS[1]["prompt"], "6", "5"]
