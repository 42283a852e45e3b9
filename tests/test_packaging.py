"""Console scripts from a non-editable install: the wheel ships ``conf/`` and the CLIs find it.

The wheel is built from a copy of the checkout, installed with ``--no-deps`` into a fresh virtual
env that sees this env's packages (torch, Hydra, ...) but not its editable ``diffllm``, and the
CLIs compose their configs from a folder that has no ``conf/``.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "outputs", "multirun", "runs", ".*cache"
)


def sh(*cmd: str | Path, cwd: Path) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh venv holding the diffllm wheel (and nothing else of diffllm)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=IGNORE)
    sh(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        tmp / "dist",
        src,
        cwd=tmp,
    )
    (wheel,) = (tmp / "dist").glob("diffllm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert {f"diffllm/conf/{c}" for c in conf} <= names, "the wheel lacks configs"
    lists = {
        f"diffllm/bench/recipe_lists/{p.name}" for p in (ROOT / "diffllm/bench/recipe_lists").glob("*.yaml")
    }
    assert lists and lists <= names, "the wheel lacks the recipe lists of python -m diffllm.bench.recipes"

    venv = tmp / "venv"
    sh(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp)
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    # this env's packages come after the wheel's site-packages; its .pth files (the editable
    # diffllm) are not run, as a path listed in a .pth file is not a site directory
    (purelib / "test_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    sh(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp)  # fmt: skip
    where = sh(venv / "bin" / "python", "-c", "import diffllm; print(diffllm.__file__)", cwd=tmp)
    assert where.strip().startswith(str(purelib)), where
    return venv / "bin"


@pytest.mark.slow
def test_installed_console_scripts_compose_their_configs_from_another_directory(installed, tmp_path):
    job = yaml.safe_load(
        sh(installed / "diffllm-train", "--cfg", "job", "+experiment=tiny_sweep", "lora.r=4", cwd=tmp_path)
    )
    assert job["lora"]["r"] == 4 and job["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (
        job["trainer"]["_target_"] == "diffllm.training.trainer.build_trainer"
        and job["trainer"]["max_steps"] == 10
    )  # experiment
    assert job["model"]["pretrained"] == "${asset:tiny/ar_base}"
    assert job["loss"]["_target_"] == "diffllm.diffusion.loss.MaskedDiffusionLoss"
    # the other CLIs read CONF_DIR the same way; one of them stands for all (each start costs seconds)
    generate = yaml.safe_load(
        sh(installed / "diffllm-generate", "--cfg", "job", "sampler.steps=16", cwd=tmp_path)
    )
    assert generate["sampler"]["steps"] == 16 and generate["ckpt_path"] == "???"
    assert not (tmp_path / "conf").exists()
