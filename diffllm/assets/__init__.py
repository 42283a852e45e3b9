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

``TINY_LONG_DIR`` holds the same files for the long-answer world (``diffllm.data.tiny_long_tasks``:
answers of 32-63 tokens, the tiny tokenizer, an AR base with 256 positions), rebuilt by
``python -m diffllm.assets tiny_long``.
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
TINY_LONG_DIR = TINY_DIR.parent / "tiny_long"
TINY_LONG_AR_BASE = TINY_LONG_DIR / AR_BASE

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


def ensure_tiny_assets(force: bool = False, out: str | Path | None = None, name: str = "tiny") -> Path:
    """The tiny assets folder, built first (about 3 minutes on 2 CPU cores) if incomplete or ``force``.

    ``name`` picks the world: ``tiny`` (``TINY_DIR``) or ``tiny_long`` (``TINY_LONG_DIR``, about an
    hour on one thread); ``out`` another folder for it.
    """
    if name not in ("tiny", "tiny_long"):
        raise ValueError(f"unknown embedded world {name!r}; choose 'tiny' or 'tiny_long'")
    directory = Path(out) if out is not None else TINY_DIR.parent / name
    if force or missing_files(directory):
        from diffllm.assets.build import TASK_SETS, build  # imports torch/transformers only when building

        build(directory, task_set=TASK_SETS[name])
    return directory


def build_info(directory: str | Path = TINY_DIR) -> dict:
    """The recorded build config and AR figures (``build_info.json``)."""
    return json.loads((Path(directory) / BUILD_INFO).read_text())
