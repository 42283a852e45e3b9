"""Kill-and-resume equality: a run stopped by SIGTERM at a random step and resumed ends where the
uninterrupted run ends, tensor for tensor.

    python -m diffllm.bench.resume [--steps 2K] [--kill-at K] [--seed S] [--out-dir DIR] [-- overrides]

Three runs of the embedded default (CPU, in this process, ``diffllm.bench.kill_resume``): the
uninterrupted run to ``--steps``; the same run sent a real SIGTERM after optimizer step
``--kill-at`` (random in [1, steps - 1] unless given), which writes ``last.ckpt`` and stops with
exit code 143; and a fresh Trainer resumed from that checkpoint to ``--steps``. Prints the
trainable tensors equal (``torch.equal``) out of the total, and every final validation metric of
the two runs side by side.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from diffllm.bench.kill_resume import compare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    kill_at = args.kill_at or random.Random().randint(1, args.steps - 1)
    root = Path(args.out_dir or tempfile.mkdtemp(prefix="diffllm-resume-"))
    figures = compare(args.steps, kill_at, args.seed, root, args.overrides)
    print(
        f"SIGTERM after step {kill_at} (stopped at step {figures['stopped_at']}, exit code "
        f"{figures['exit_code']}), resumed to step {args.steps}: trainable tensors equal "
        f"{figures['equal']} / {figures['total']}"
    )
    print("| metric | uninterrupted | killed + resumed | equal |\n|---|---|---|---|")
    for key, (x, y) in figures["metrics"].items():
        print(f"| {key} | {x:.6f} | {'-' if y is None else f'{y:.6f}'} | {'yes' if x == y else 'NO'} |")


if __name__ == "__main__":
    main()
