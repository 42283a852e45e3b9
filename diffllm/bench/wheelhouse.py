"""Offline installs for GPU nodes without network: a folder of wheels made here, installed there.

    python -m diffllm.bench.wheelhouse download [--dest wheelhouse] [--python 3.12] [--only NAME ...]
    python -m diffllm.bench.wheelhouse install  [--dest wheelhouse]

``download`` (on a machine with the project installed and registry access) walks the project's
installed dependency closure, pins every package to the version installed here, and saves one
wheel each for the target Python and manylinux x86-64 (pure-Python sdists are built into wheels).
torch and its CUDA/triton wheels are left out: a GPU node brings its own build. ``--only`` keeps
the named packages (what a node's image lacks, when the folder must stay small). It also writes
``requirements.txt``: the project's own requirements, torch excluded.

``install`` (on the node, standard library only) runs ``pip install --no-index --find-links``
for each requirement of that file: packages already installed that satisfy it are kept, the rest
come from the folder. A requirement that cannot be met offline is named at the end (exit 1), and
does not stop the others from installing.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

SKIP = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _runtime(requirements: list[str] | None) -> list[str]:
    return [r for r in requirements or [] if "extra ==" not in r]


def closure(root: str = "diffllm") -> dict[str, str]:
    """{package: installed version} of every runtime dependency of ``root``, torch & CUDA left out."""
    seen: dict[str, str] = {}
    todo = [_name(r) for r in _runtime(metadata.requires(root))]
    while todo:
        name = todo.pop()
        if name in seen or SKIP.match(name):
            continue
        try:
            seen[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a marker-excluded dependency (another platform or Python)
        todo.extend(_name(r) for r in _runtime(metadata.requires(name)))
    return dict(sorted(seen.items()))


def download(dest: Path, python: str, only: list[str] | None) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    pins = closure()
    if only:
        wanted = {_name(n) for n in only}
        unknown = wanted - set(pins)
        if unknown:
            sys.exit(f"--only {sorted(unknown)}: not in the project's dependency closure {sorted(pins)}")
        pins = {k: v for k, v in pins.items() if k in wanted}
    reqs = [r for r in _runtime(metadata.requires("diffllm")) if not SKIP.match(_name(r))]
    (dest / "requirements.txt").write_text("\n".join(reqs) + "\n")
    pip = [sys.executable, "-m", "pip"]
    for name, version in pins.items():
        spec = f"{name}=={version}"
        platform = [a for p in PLATFORMS for a in ("--platform", p)]
        binary = pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
        binary += ["--python-version", python, "--implementation", "cp", *platform, spec]
        if subprocess.run(binary, capture_output=True).returncode == 0:
            print(f"  {spec}")
            continue
        built = subprocess.run(pip + ["wheel", "-q", "--no-deps", "-w", str(dest), spec], capture_output=True)
        if built.returncode != 0:
            sys.exit(f"no wheel for {spec} (python {python}):\n{built.stderr.decode()[-800:]}")
        print(f"  {spec} (built from source)")
    print(f"{len(pins)} wheel(s) and requirements.txt in {dest}")


def install(dest: Path) -> None:
    reqs = dest / "requirements.txt"
    if not reqs.exists():
        sys.exit(f"{reqs} is missing: make it with `python -m diffllm.bench.wheelhouse download`")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--find-links",
        str(dest),
        "-r",
        str(reqs),
    ]
    sys.exit(subprocess.run(cmd).returncode)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["download", "install"])
    p.add_argument("--dest", default="wheelhouse")
    p.add_argument("--python", default="3.12", help="the GPU node's Python version (download)")
    p.add_argument("--only", nargs="*", default=None, help="package names to keep (download)")
    args = p.parse_args(argv)
    if args.action == "download":
        download(Path(args.dest), args.python, args.only)
    else:
        install(Path(args.dest))


if __name__ == "__main__":
    main()
