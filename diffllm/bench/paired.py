"""Two conversions against each other, paired over the same rows: ``python -m diffllm.bench.paired``.

    python -m diffllm.bench.paired RUN_A/eval.json RUN_B/eval.json [RUN_C/eval.json ...]

Each eval.json after the first is held against the first (the reference), row by row, from the
per-row figures ``diffllm.evaluate`` writes (``compare.per_row_figures``):

* the bound and the left-to-right NLL: sum_i (b_i - a_i) / sum_i n_i over the scored rows (nats per
  answer token, end token included), with the delta-method SE of that ratio
  (``scoring.ratio_mean_se``); the rows must be the same (equal token counts, row by row);
* exact match: mean_j (b_j - a_j) over the generated prompts, SE sd / sqrt(m) (``scoring.mean_se``).

Two conversions scored on the same rows are far closer than their separate SEs suggest (the hard
rows are hard for both), so this is the SE to quote when one recipe is said to beat another.
Nothing is recomputed: the figures are the ones the evaluations wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffllm.evaluation.scoring import mean_se, ratio_mean_se

NLL_KEYS = {"bound": "diffusion", "L2R NLL": "diffusion_l2r"}


def _per_row(ev: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    per_row = ev.get("per_row")
    if not per_row:
        raise ValueError(
            f"{name} has no per-row figures (key 'per_row'): re-run python -m diffllm.evaluate on it"
        )
    return per_row


def paired_figures(
    reference: Mapping[str, Any], other: Mapping[str, Any], names: Sequence[str] = ("A", "B")
) -> dict:
    """{figure: (other - reference, SE)} for the bound, the L2R NLL and exact match, paired by row.

    The NLL figures need the same scored rows (equal token counts row by row), exact match the same
    number of generated prompts (the first ``gen_rows`` of the same validation split, in order); a
    figure whose rows differ is left out, and ``ValueError`` (naming both files) is raised when
    nothing is left.
    """
    ref, oth = _per_row(reference, names[0]), _per_row(other, names[1])
    out: dict[str, tuple[float, float]] = {}
    tokens = ref["scored"].get("tokens", [])
    if tokens and tokens == oth["scored"].get("tokens", []):
        for figure, key in NLL_KEYS.items():
            if key in ref["scored"] and key in oth["scored"]:
                d = np.asarray(oth["scored"][key], dtype=float) - np.asarray(ref["scored"][key], dtype=float)
                out[figure] = ratio_mean_se(d, np.asarray(tokens, dtype=float))
    a, b = ref["generated"].get("diffusion_match"), oth["generated"].get("diffusion_match")
    if a is not None and b is not None and len(a) == len(b):
        out["exact match"] = mean_se(np.asarray(b, dtype=float) - np.asarray(a, dtype=float))
    if not out:
        raise ValueError(
            f"{names[0]} and {names[1]} share neither their scored rows ({len(tokens)} against "
            f"{len(oth['scored'].get('tokens', []))}, or other token counts) nor their number of generated prompts: "
            "evaluate both with the same data, rows=, gen_rows= and seed"
        )
    return out


def table(paths: Sequence[Path]) -> str:
    """The markdown table of every file after the first against the first."""
    evals = [json.loads(Path(p).read_text()) for p in paths]
    lines = [
        f"Paired against `{paths[0]}` (nats per answer token; exact match as a fraction), ± SE over the same rows",
        "",
        "| eval.json | bound − ref | L2R NLL − ref | exact match − ref |",
        "|---|---:|---:|---:|",
    ]
    for path, ev in zip(paths[1:], evals[1:], strict=True):
        fig = paired_figures(evals[0], ev, (str(paths[0]), str(path)))
        cells = [
            f"{fig[k][0]:+.3f} ± {fig[k][1]:.3f}" if k in fig else "—"
            for k in ("bound", "L2R NLL", "exact match")
        ]
        lines.append(f"| `{path}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffllm.bench.paired", description=__doc__.splitlines()[0]
    )
    parser.add_argument("reference", type=Path, help="the eval.json every other one is held against")
    parser.add_argument("others", type=Path, nargs="+", help="eval.json files scored on the same rows")
    args = parser.parse_args(argv)
    for path in [args.reference, *args.others]:
        if not path.is_file():
            print(
                f"error: {path} does not exist (an eval.json written by python -m diffllm.evaluate)",
                file=sys.stderr,
            )
            return 2
    try:
        print(table([args.reference, *args.others]))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
