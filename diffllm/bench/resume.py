"""Kill-and-resume equality: a run stopped at any optimizer step and resumed ends where the
uninterrupted run ends, tensor for tensor and log row for log row.

    python -m diffllm.bench.resume [--steps N] [--kill-at K] [--signal TERM|USR1] [--seed S] [--out-dir DIR] [overrides]
    python -m diffllm.bench.resume --every-step [--steps N] [--seed S ...] [--out-dir DIR] [overrides]

The runs are ``diffllm.bench.kill_resume``'s, on the embedded default (CPU, in this process).
Without ``--every-step``: the uninterrupted run to ``--steps``; the same run sent a real signal
during optimizer step ``--kill-at`` + 1 (K random in [1, steps - 1] unless given), which stops at
the end of that step: SIGTERM writes ``last.ckpt`` and exits 143, SIGUSR1 writes
``hpc_ckpt_1.ckpt`` and exits 138 (and requeues under SLURM); and that run resumed in its folder
(SIGUSR1: with no ``ckpt_path``, as a requeued job starts).
Prints the trainable tensors equal (``torch.equal``) out of the total, whether the AdamW and LR
scheduler states, ``metrics.csv`` and ``val_samples.csv`` are equal, and every final metric side by side.

With ``--every-step``: one run checkpointing at the end of every step, resumed from each step
1 .. N - 1 in its folder as it stood then; one table row per resume (and per seed).
"""

from __future__ import annotations

import argparse
import random
import signal
import tempfile
from pathlib import Path

from diffllm.bench.kill_resume import every_step, kill_and_resume, reference_run


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def print_kill(figures: dict, steps: int, name: str) -> None:
    rows_a, rows_b = figures["metrics_rows"]
    print(
        f"{name} during step {figures['kill_at'] + 1} (stopped at step {figures['stopped_at']}, exit code "
        f"{figures['exit_code']}), resumed to step {steps}: trainable tensors equal "
        f"{figures['equal']} / {figures['total']}; AdamW + LR scheduler state equal: "
        f"{yes(figures['training_state'])}; metrics.csv equal: {yes(figures['metrics_csv'])} "
        f"({rows_a} / {rows_b} rows); val_samples.csv equal: {yes(figures['samples_csv'])}"
    )
    if figures["stopped_at"] == steps:
        print("(the stop came at the last step: the resumed run had nothing left to run)")
        return
    print("| metric | uninterrupted | killed + resumed | equal |\n|---|---|---|---|")
    for key, (x, y) in figures["metrics"].items():
        print(f"| {key} | {x:.6f} | {'-' if y is None else f'{y:.6f}'} | {yes(x == y)} |")


def print_every_step(results: list[dict], seed: int) -> None:
    print(f"\nseed {seed}: resumed from the end of each step, to step {results[0]['end_steps'][0]}")
    print("| from step | tensors equal | AdamW + LR state | metrics.csv | val_samples.csv | best score |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['resumed_from']} | {r['equal']} / {r['total']} | {yes(r['training_state'])} | "
            f"{yes(r['metrics_csv'])} | {yes(r['samples_csv'])} | {yes(r['best_score'])} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--signal", choices=("TERM", "USR1"), default="TERM")
    parser.add_argument("--every-step", action="store_true")
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    root = Path(args.out_dir or tempfile.mkdtemp(prefix="diffllm-resume-"))
    for seed in args.seed:
        out = root / f"seed{seed}"
        reference = reference_run(args.steps, seed, out, args.overrides)
        if args.every_step:
            print_every_step(every_step(reference, out), seed)
            continue
        kill_at = args.kill_at or random.Random().randint(1, args.steps - 1)
        signum = signal.Signals[f"SIG{args.signal}"]
        print_kill(kill_and_resume(reference, kill_at, out, signum=int(signum)), args.steps, signum.name)
    print(f"\nrun folders: {root}")


if __name__ == "__main__":
    main()
