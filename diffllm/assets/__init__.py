"""The embedded tiny world that the default run uses (no hub, no GPU).

``TINY_DIR`` holds, committed to the repository and rebuilt by ``python -m diffllm.assets``:

    train.jsonl, val.jsonl   Alpaca rows {instruction, input, output, task} (diffllm.data.tiny_tasks)
    ar_base/                 a tiny LlamaForCausalLM trained autoregressively on train.jsonl,
                             with its tokenizer (BOS/EOS/PAD, no mask token); load it with
                             AutoModelForCausalLM / AutoTokenizer.from_pretrained(AR_BASE_DIR)
    build_info.json          build config, sizes and the measured AR figures
    README.md                the same, for people

``ALPACA_SAMPLE``: the first 100 records of the Stanford Alpaca data (CC BY-NC 4.0, not Apache-2.0:
``alpaca/README.md``), prompts no run trains on, for ``python -m diffllm.evaluate agreement_file=...``.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_DIR = Path(__file__).resolve().parent / "tiny"
TRAIN_FILE = "train.jsonl"
VAL_FILE = "val.jsonl"
AR_BASE = "ar_base"
BUILD_INFO = "build_info.json"
TINY_TRAIN = TINY_DIR / TRAIN_FILE
TINY_VAL = TINY_DIR / VAL_FILE
TINY_AR_BASE = TINY_DIR / AR_BASE
TINY_TEMPLATE = "short"
ALPACA_SAMPLE = TINY_DIR.parent / "alpaca" / "alpaca_sample.json"

_REQUIRED = (
    TRAIN_FILE,
    VAL_FILE,
    BUILD_INFO,
    f"{AR_BASE}/config.json",
    f"{AR_BASE}/model.safetensors",
    f"{AR_BASE}/tokenizer.json",
    f"{AR_BASE}/tokenizer_config.json",
)


def missing_files(directory: str | Path = TINY_DIR) -> list[str]:
    """The asset files absent from ``directory`` (empty when it is complete)."""
    return [name for name in _REQUIRED if not (Path(directory) / name).is_file()]


def ensure_tiny_assets(force: bool = False, out: str | Path | None = None) -> Path:
    """The tiny assets folder, built first (about 3 minutes on 2 CPU cores) if incomplete or ``force``."""
    directory = Path(out) if out is not None else TINY_DIR
    if force or missing_files(directory):
        from diffllm.assets.build import build  # imports torch/transformers only when building

        build(directory)
    return directory


def build_info(directory: str | Path = TINY_DIR) -> dict:
    """The recorded build config and AR figures (``build_info.json``)."""
    return json.loads((Path(directory) / BUILD_INFO).read_text())
