"""Two evaluations paired row by row (diffllm.bench.paired), against a hand computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diffllm.bench.paired import main, paired_figures


def fake_eval(tokens, bound, l2r, match):
    return {
        "per_row": {
            "scored": {"tokens": tokens, "diffusion": bound, "diffusion_l2r": l2r},
            "generated": {"diffusion_match": match},
        }
    }


TOKENS = [4, 5, 3, 6]
A = fake_eval(TOKENS, [2.0, 1.0, 0.5, 3.0], [1.0, 0.5, 0.25, 1.5], [1.0, 0.0, 1.0, 1.0])
B = fake_eval(TOKENS, [1.0, 1.5, 0.5, 2.0], [1.0, 0.25, 0.25, 1.0], [1.0, 1.0, 0.0, 1.0])


def test_paired_differences_equal_the_hand_computation():
    fig = paired_figures(A, B)
    # bound: d = (-1, 0.5, 0, -1), sum n = 18 -> R = -1.5 / 18; delta-method SE of the ratio
    d = np.array([-1.0, 0.5, 0.0, -1.0])
    n = np.array(TOKENS, dtype=float)
    r = d.sum() / n.sum()
    se = math.sqrt(((d - r * n) ** 2).sum() / (4 * 3)) / n.mean()
    assert fig["bound"] == pytest.approx((r, se))
    assert fig["L2R NLL"][0] == pytest.approx(-0.75 / 18)
    # exact match: d = (0, 1, -1, 0): mean 0, SE sd(ddof=1) / sqrt(4)
    assert fig["exact match"] == pytest.approx((0.0, np.std([0, 1, -1, 0], ddof=1) / 2))
    # the reference against itself: zero, and B - A = -(A - B)
    assert paired_figures(A, A)["bound"][0] == 0.0
    assert paired_figures(B, A)["bound"][0] == pytest.approx(-r)


def test_figures_of_other_rows_are_left_out_and_nothing_comparable_is_refused_by_name():
    other_rows = fake_eval([4, 5, 3, 7], [1.0] * 4, [1.0] * 4, [0.0, 1.0, 1.0, 1.0])
    assert set(paired_figures(A, other_rows)) == {"exact match"}  # same prompts, other scored rows
    fewer = fake_eval(TOKENS, [1.0] * 4, [1.0] * 4, [1.0] * 3)
    assert set(paired_figures(A, fewer)) == {"bound", "L2R NLL"}
    neither = fake_eval([1, 1], [1.0] * 2, [1.0] * 2, [1.0] * 3)
    with pytest.raises(
        ValueError, match=r"a\.json and b\.json share neither their scored rows \(4 against 2"
    ):
        paired_figures(A, neither, ("a.json", "b.json"))
    with pytest.raises(ValueError, match="no per-row figures"):
        paired_figures({}, A)


def test_cli_prints_one_row_per_file_and_exits_2_on_bad_input(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(A))
    b.write_text(json.dumps(B))
    assert main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith(f"| `{b}`")]
    assert f"{-1.5 / 18:+.3f}" in row and "+0.000 ±" in row
    assert main([str(a), str(tmp_path / "missing.json")]) == 2
    assert "missing.json does not exist" in capsys.readouterr().err
    b.write_text(json.dumps(fake_eval([1, 1, 1, 1], [1.0] * 4, [1.0] * 4, [1.0] * 2)))
    assert main([str(a), str(b)]) == 2
    assert "share neither" in capsys.readouterr().err
