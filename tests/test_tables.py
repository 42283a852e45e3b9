"""The one renderer and the one name map: exact layouts, the same rows in every view, renamed keys."""

from __future__ import annotations

import math

from diffllm.evaluation.names import MODELS, deprecated_name, models_in, with_deprecated_keys
from diffllm.evaluation.plots import quality_vs_steps_data
from diffllm.evaluation.tables import (
    Table,
    format_markdown,
    format_report,
    generation_table,
    plus_minus,
    render,
    sweep_table,
)


def test_plus_minus():
    r = {"a": 0.5, "a_se": 0.0625, "b": 2, "c": float("nan"), "d": 1.0, "d_se": float("nan")}
    assert plus_minus(r, "a") == "0.500 ± 0.062" and plus_minus(r, "a", 1) == "0.5 ± 0.1"
    assert plus_minus(r, "b", 0) == "2" and plus_minus(r, "d") == "1.000"
    assert plus_minus(r, "c") == plus_minus(r, "missing") == "—"


def test_render_text_and_markdown_exactly():
    t = Table(
        "title", ["metric", "x", "long column"], [["a", "1", "2.50"], ["longer name", "10", "—"]], ["a note"]
    )
    assert render([t], markdown=True) == [
        "",
        "## title",
        "",
        "| metric | x | long column |",
        "|---|---:|---:|",
        "| a | 1 | 2.50 |",
        "| longer name | 10 | — |",
        "",
        "a note",
    ]
    assert render([t]) == [
        "",
        "title",
        "  metric               x   long column",
        "  a                    1          2.50",
        "  longer name         10             —",
        "  a note",
    ]
    pipes = Table("", ["prompt", "reference"], [["a | b\nc", "d"]], numeric=False)
    assert render([pipes], markdown=True)[1:] == ["| prompt | reference |", "|---|---|", "| a \\| b⏎c | d |"]


def _report(ar_sft: bool) -> dict:
    r = {"rows": 4, "gen_rows": 4, "answer_tokens": 9, "answer_tokens_no_end": 5, "unigram_ce": 3.0}
    r.update(
        {"nll_bound": 2.0, "nll_bound_se": 0.1, "ar_nll": 1.0, "ar_nll_se": 0.1, "gap": 1.0, "gap_se": 0.05}
    )
    models = ["diffusion", "ar_base"] + (["ar_sft"] if ar_sft else [])
    for i, m in enumerate(models):
        r.update(
            {f"{m}_exact_match": 0.25 * (i + 1), f"{m}_exact_match_se": 0.1, f"{m}_rougeL": 0.2 * (i + 1)}
        )
        r.update({f"{m}_seconds": 1.0, f"{m}_nfe": 8})
    ref = "ar_sft" if ar_sft else "ar_base"
    r[f"diffusion_minus_{ref}_exact_match"] = -0.5
    r["steps_grid"] = [{"steps": 4, "exact_match": 0.0, "rougeL": 0.1, "nfe": 4, "seconds": 0.5}]
    return r


def test_the_generation_table_and_the_steps_plot_show_the_same_models():
    for ar_sft in (False, True):
        r = _report(ar_sft)
        table = generation_table(r)
        assert table.header[1:] == [label for _, label in models_in(r)]
        others = [label for _, label in models_in(r) if label != "diffusion"]
        refs = quality_vs_steps_data(r)["references"]
        assert sorted(refs) == sorted(f"{label} {m}" for label in others for m in ("exact match", "ROUGE-L"))
        expected = "AR-SFT" if ar_sft else "AR base"
        assert table.rows[-1][0] == f"exact match - {expected}" and table.rows[-1][1] == "-0.500"
    assert models_in(_report(True)) == [(m, MODELS[m]) for m in ("diffusion", "ar_sft", "ar_base")]


def test_text_and_markdown_views_show_the_same_figures():
    r = {
        **_report(True),
        "source": "x",
        "data": "d",
        "sampler": {"steps": 4},
        "steps_skipped": [],
        "examples": [],
    }
    r["likelihood"] = {"num_samples": 2, "method": "grid", "batch_size": 4, "seed": 0}
    text, md = format_report(r), format_markdown(r)
    for cell in ("2.000 ± 0.100", "1.000 ± 0.050", "0.750 ± 0.100", "3.000"):
        assert cell in text and f"| {cell} |" in md, cell
    assert (
        "diffusion, ELBO upper bound" in text and "| diffusion, ELBO upper bound | 2.000 ± 0.100 | 9 |" in md
    )


def test_a_skipped_step_count_keeps_its_row_and_reason():
    rows = [
        {"steps": 2, "skipped": "steps=2 cannot be spread evenly over 4 blocks"},
        {"steps": 4, "nfe": 4, "seconds": 0.25},
    ]
    t = sweep_table(rows, "sweep")
    assert t.header == ["steps", "forward passes", "seconds"]
    assert t.rows == [["2", "—", "—"], ["4", "4", "0.25"]]
    assert t.notes == ["(steps=2 skipped: steps=2 cannot be spread evenly over 4 blocks)"]


def test_renamed_keys_are_written_beside_the_new_ones():
    r = {
        "ar_nll": 1.0,
        "ar_base_exact_match": 0.5,
        "diffusion_minus_ar_base_exact_match": -0.25,
        "reference_free": {"ar_base": {"eos_rate": 1.0}},
        "examples": [{"diffusion": "a", "ar_base": "b"}],
    }
    out = with_deprecated_keys(r)
    assert list(out) == [
        "ar_nll",
        "ar_base_exact_match",
        "ar_exact_match",
        "diffusion_minus_ar_base_exact_match",
        "diffusion_minus_ar_exact_match",
        "reference_free",
        "examples",
    ]
    assert out["ar_exact_match"] == 0.5 and out["diffusion_minus_ar_exact_match"] == -0.25
    assert out["reference_free"] == {"ar_base": {"eos_rate": 1.0}, "ar": {"eos_rate": 1.0}}
    assert out["examples"] == [{"diffusion": "a", "ar_base": "b", "ar": "b"}]
    assert r["examples"] == [{"diffusion": "a", "ar_base": "b"}]  # the input is left as it was
    for kept in ("ar_nll", "ar_sft_exact_match", "ar_scored_nll", "gap", "nll_bound"):
        assert deprecated_name(kept) is None, kept
    assert math.isnan(with_deprecated_keys({"ar_base_nfe": float("nan")})["ar_nfe"])


def test_a_report_written_before_the_rename_reads_with_todays_names():
    """report.json / eval.json of an older version (the base model under ``ar``): every table and plot
    shows its base-model rows; the old and the new names map onto each other."""
    from diffllm.evaluation.names import current_name, with_current_keys

    new = _report(ar_sft=True)
    old = {
        (deprecated_name(k) or k): v
        for k, v in new.items()
        if not (k.startswith("ar_base") or "_minus_ar_base_" in k)
    }
    old.update(
        {deprecated_name(k): v for k, v in new.items() if k.startswith("ar_base") or "_minus_ar_base_" in k}
    )
    assert "ar_exact_match" in old and not any(k.startswith("ar_base") for k in old)
    assert with_current_keys(old)["ar_base_exact_match"] == new["ar_base_exact_match"]
    assert generation_table(with_current_keys(old)).header == ["metric", "diffusion", "AR-SFT", "AR base"]
    assert format_report(old) == format_report(new)
    assert quality_vs_steps_data(old)["references"] == quality_vs_steps_data(new)["references"]
    for key in ("ar_base_exact_match", "ar_base_rougeL_se", "ar_base_minus_ar_sft_exact_match", "ar_base"):
        assert current_name(deprecated_name(key)) == key
    assert current_name("diffusion_minus_ar_exact_match_se") == "diffusion_minus_ar_base_exact_match_se"
    for kept in ("ar_nll", "ar_nll_se", "ar_sft_nll", "ar_scored_nll", "ar_ckpt_path", "ar_ppl"):
        assert current_name(kept) is None, kept
    # eval.json's per-row scores were always keyed ar_base; their l2r row was diffusion_l2r
    per_row = {
        "per_row": {"scored": {"ar_base": [1.0], "diffusion_l2r": [2.0]}, "generated": {"ar_match": [1.0]}}
    }
    assert with_current_keys(per_row)["per_row"] == {
        "scored": {"ar_base": [1.0], "diffusion_l2r": [2.0], "l2r_nll": [2.0]},
        "generated": {"ar_match": [1.0], "ar_base_match": [1.0]},
    }
    assert with_deprecated_keys({"per_row": {"scored": {"ar_base": [1.0], "l2r_nll": [2.0]}}}) == {
        "per_row": {"scored": {"ar_base": [1.0], "l2r_nll": [2.0], "diffusion_l2r": [2.0]}}
    }
