"""Schedule x shift x weighting ablation on the embedded default: one Hydra multirun, one table.

    python -m diffllm.bench.ablation [--out-dir DIR] [--steps N] [-- extra hydra overrides]

Runs ``python -m diffllm.train -m +experiment=ablation schedule=... model.shift=... loss=...``,
then reads each job's final ``val/nll_bound``, ``val/ar_nll`` and ``val/gap`` from its
``logs/metrics.csv`` and writes ``ablation.csv`` and ``ablation.md`` into the sweep folder.
The bound is always evaluated with the ELBO (linear grid), whatever the training loss.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

AXES = {
    "schedule": ["linear", "cosine"],
    "model.shift": ["true", "false"],
    "loss": ["elbo", "uniform_hidden"],
}
COLUMNS = ("val/nll_bound", "val/ar_nll", "val/gap", "val/exact_match")


def last_values(metrics_csv: Path) -> dict[str, float]:
    """The last logged value of each column of a Lightning CSV log."""
    out: dict[str, float] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def parse_job_dir(name: str) -> dict[str, str]:
    """``+experiment=ablation,loss=elbo,model.shift=true,schedule=cosine`` -> {key: value}."""
    return dict(part.split("=", 1) for part in name.split(",") if "=" in part)


def collect(sweep_dir: Path) -> list[dict[str, object]]:
    rows = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        logs = list(job.glob("logs/metrics.csv"))
        if not logs:
            continue
        keys = parse_job_dir(job.name)
        vals = last_values(logs[0])
        rows.append({**{k: keys.get(k, "") for k in AXES}, **{c: vals.get(c, float("nan")) for c in COLUMNS}})
    return rows


def to_markdown(rows: list[dict[str, object]]) -> str:
    head = [*AXES, *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: r["val/nll_bound"]):
        cells = [str(r[k]) for k in AXES] + [f"{r[c]:.3f}" for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=f"multirun/ablation-{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per job (default: the experiment's)"
    )
    ap.add_argument(
        "--collect-only", action="store_true", help="only rebuild the table from an existing sweep"
    )
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = ap.parse_args(argv)
    sweep = Path(args.out_dir)
    if not args.collect_only:
        cmd = [
            sys.executable,
            "-m",
            "diffllm.train",
            "-m",
            "+experiment=ablation",
            f"hydra.sweep.dir={sweep}",
        ]
        cmd += [f"{k}={','.join(v)}" for k, v in AXES.items()]
        if args.steps:
            cmd += [f"trainer.max_steps={args.steps}", f"trainer.val_every_n_steps={args.steps}"]
        cmd += args.overrides
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    rows = collect(sweep)
    if not rows:
        raise SystemExit(f"no finished job under {sweep}")
    with open(sweep / "ablation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*AXES, *COLUMNS])
        w.writeheader()
        w.writerows(rows)
    md = to_markdown(rows)
    (sweep / "ablation.md").write_text(md + "\n")
    print(md)
    print(f"\nwritten: {sweep / 'ablation.csv'}, {sweep / 'ablation.md'}")


if __name__ == "__main__":
    main()
