"""diffllm.cli.evaluate: reproduces the run's validation figures exactly, writes its report files."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import numpy as np
import pytest

from diffllm.cli.evaluate import (
    default_out_dir,
    default_steps_grid,
    evaluate,
    length_buckets,
    main,
    pooled,
    validated_rows,
)
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.evaluation.compare import exact_match_by_task

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# tiny models on 2 shared cores: OpenMP threads only add spin-wait overhead (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cli_eval(tiny_run, tiny_ar_run, tmp_path_factory):
    """``python -m diffllm.evaluate ckpt_path=... ar_ckpt_path=... out_dir=... steps_grid=[2,8,16]``
    in-process; returns (out folder, eval.json, what it printed)."""
    out = tmp_path_factory.mktemp("eval")
    argv = sys.argv
    sys.argv = [
        "diffllm.evaluate",
        f"ckpt_path={tiny_run[1]}",
        f"ar_ckpt_path={tiny_ar_run[1]}",
        f"out_dir={out}",
        "steps_grid=[2,8,16]",
        "progress=false",
    ]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            main()
    finally:
        sys.argv = argv
    return out, json.loads((out / "eval.json").read_text()), printed.getvalue()


def test_evaluate_reproduces_the_runs_validation_metrics(tiny_run, tiny_ar_run, cli_eval):
    """Same rows (limit_val_batches=1 batch of the 16 val rows), same seed per batch, same estimator:
    the figures equal what training logged for this checkpoint, and for the AR-SFT checkpoint."""
    _, _, metrics = tiny_run
    _, r, _ = cli_eval
    assert r["rows"] == 16 and r["likelihood"]["num_samples"] == 2 and r["likelihood"]["method"] == "grid"
    assert r["nll_bound"] == pytest.approx(metrics["val/nll_bound"], abs=1e-4)
    assert r["ar_nll"] == pytest.approx(metrics["val/ar_nll"], abs=1e-4)
    assert r["ar_nll_no_end"] == pytest.approx(metrics["val/ar_nll_no_end"], abs=1e-4)
    assert r["ar_sft_nll"] == pytest.approx(tiny_ar_run[2]["val/ar_sft_nll"], abs=1e-4)
    assert r["gap"] == pytest.approx(r["nll_bound"] - r["ar_nll"])
    assert r["ppl_bound"] == pytest.approx(np.exp(r["nll_bound"]))


def test_evaluate_prints_the_three_rows_with_standard_errors(cli_eval):
    _, r, printed = cli_eval
    for key, label in (
        ("nll_bound", "diffusion, ELBO upper bound"),
        ("ar_sft_nll", "AR-SFT, same budget"),
        ("ar_nll", "AR base, unadapted"),
        ("ar_nll_no_end", "AR base, without end token"),
        ("gap_sft", "bound - AR-SFT"),
    ):
        line = next(line for line in printed.splitlines() if label in line)
        assert f"{r[key]:.3f} ± {r[key + '_se']:.3f}" in line, line
    em = next(line for line in printed.splitlines() if line.strip().startswith("exact match"))
    for model in ("diffusion", "ar_sft", "ar"):
        assert f"{r[model + '_exact_match']:.3f} ± {r[model + '_exact_match_se']:.3f}" in em
    assert "EM diffusion - AR-SFT" in printed and "BLEU-4" in printed


def test_evaluate_report_contents(cli_eval):
    out, r, _ = cli_eval
    # buckets partition the scored rows and pool back to the headline figures
    buckets = r["length_buckets"]
    assert sum(b["rows"] for b in buckets) == r["rows"]
    assert sum(b["tokens"] for b in buckets) == r["answer_tokens"]
    assert sum(b["nll_bound"] * b["tokens"] for b in buckets) / r["answer_tokens"] == pytest.approx(
        r["nll_bound"]
    )
    # the sweep: 16 > gen_length=8 is refused by the sampler config and reported, not silently dropped
    assert [g["steps"] for g in r["steps_grid"]] == [2, 8]
    assert [s["steps"] for s in r["steps_skipped"]] == [16]
    assert all(1 <= g["nfe"] <= g["steps"] for g in r["steps_grid"])  # one batch of 16 prompts
    # the run's sampler uses steps=8: that sweep point is the headline diffusion result
    at8 = r["steps_grid"][1]
    assert (at8["exact_match"], at8["rougeL"], at8["nfe"]) == (
        r["diffusion_exact_match"],
        r["diffusion_rougeL"],
        r["diffusion_nfe"],
    )
    for key in ("diffusion_exact_match", "ar_exact_match", "diffusion_rougeL", "ar_rougeL", "ar_bleu"):
        assert 0.0 <= r[key] <= 1.0, key
    assert r["gen_rows"] == 16 and len(r["examples"]) == 8
    # per task: the tiny rows carry a task; the tasks partition the generated rows and pool back
    tasks = r["by_task"]
    assert sum(t["rows"] for t in tasks) == r["gen_rows"] and len({t["task"] for t in tasks}) == len(tasks)
    assert {t["task"] for t in tasks} <= {"copy", "reverse", "sort", "add", "lookup", "count"}
    for side in ("diffusion", "ar"):
        pooled_em = sum(t[f"{side}_exact_match"] * t["rows"] for t in tasks) / r["gen_rows"]
        assert pooled_em == pytest.approx(r[f"{side}_exact_match"])
    md = (out / "eval.md").read_text()
    assert "| diffusion (ELBO upper bound) |" in md and f"{r['nll_bound']:.3f}" in md
    assert "| AR-SFT, same budget |" in md and "| task | rows | diffusion | AR-SFT | AR base |" in md
    assert "(steps=16 skipped" in md
    assert "## Exact match by task" in md and f"| {tasks[0]['task']} | {tasks[0]['rows']} |" in md
    for name in ("nll_by_length.png", "quality_vs_steps.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in md


def test_eval_json_per_row_figures_give_the_paired_differences_by_hand(cli_eval):
    """eval.json's per-row sums and matches pool back to its headline figures (computed here from
    the formulas, not through the scoring core): the paired NLL gap and exact-match difference to
    AR-SFT with their SEs, and the sampler's tokens per forward pass."""
    _, r, _ = cli_eval
    scored, gen = r["per_row"]["scored"], r["per_row"]["generated"]
    n = np.asarray(scored["tokens"], dtype=float)
    assert len(n) == r["rows"] and n.sum() == r["answer_tokens"]
    assert np.sum(scored["diffusion"]) / n.sum() == pytest.approx(r["nll_bound"], rel=1e-12)
    assert np.sum(scored["ar_sft"]) / n.sum() == pytest.approx(r["ar_sft_nll"], rel=1e-12)
    d = np.asarray(scored["diffusion"]) - np.asarray(scored["ar_sft"])
    gap = d.sum() / n.sum()
    m = len(n)
    gap_se = np.sqrt(((d - gap * n) ** 2).sum() / (m * (m - 1))) / n.mean()
    assert (gap, gap_se) == (pytest.approx(r["gap_sft"], rel=1e-12), pytest.approx(r["gap_sft_se"], rel=1e-9))
    em = np.asarray(gen["diffusion_match"]) - np.asarray(gen["ar_sft_match"])
    assert len(em) == r["gen_rows"] and set(em) <= {-1.0, 0.0, 1.0}
    assert em.mean() == pytest.approx(r["diffusion_minus_ar_sft_exact_match"], abs=1e-12)
    assert em.std(ddof=1) / np.sqrt(len(em)) == pytest.approx(
        r["diffusion_minus_ar_sft_exact_match_se"], abs=1e-12
    )
    assert np.mean(gen["ar_sft_match"]) == pytest.approx(r["ar_sft_exact_match"])
    # 16 prompts in one batch (gen_batch_size 16): every forward pass is one pass for each of 16 rows
    produced = sum(gen["diffusion_length"]) + sum(gen["diffusion_ended"])
    assert r["diffusion_tokens_per_pass"] == pytest.approx(produced / (r["diffusion_nfe"] * 16))
    assert r["ar_sft_tokens_per_pass"] <= 1.0  # greedy AR: at most one token per pass


def test_evaluate_a_data_file_with_sampler_overrides(tiny_run, tmp_path):
    rows = [
        {"instruction": "Reverse these words: cat dog sun", "input": "", "output": "sun dog cat"},
        {"instruction": "Repeat the words.", "input": "red blue", "output": "red blue"},
        {"instruction": "What is 2 + 3?", "input": "", "output": "5"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = evaluate(
        tiny_run[1],
        data_path=path,
        out_dir=tmp_path / "out",
        sampler={"strategy": "margin", "steps": 4, "stop_early": False},  # nfe == steps exactly
        steps_grid=[4],
        ar_baseline=False,
        progress=False,
    )
    assert r["rows"] == 3 and r["gen_rows"] == 3 and r["data"] == f"file {path}"
    assert [e["reference"] for e in r["examples"]] == ["sun dog cat", "red blue", "5"]
    assert r["sampler"]["strategy"] == "margin" and r["sampler"]["steps"] == 4
    assert np.isnan(r["ar_nll"]) and np.isnan(r["ar_exact_match"])
    assert r["diffusion_nfe"] == 4 and r["steps_grid"][0]["exact_match"] == r["diffusion_exact_match"]


def test_by_task_groups_rows_and_skips_untagged_data():
    tasks = ["copy", "sort", "copy", None]
    refs, diff, ar = ["a", "b", "c", "d"], ["a", "x", "x", "d"], ["a", "b", "c", "x"]
    got = {t["task"]: t for t in exact_match_by_task(tasks, refs, diffusion=diff, ar=ar, ar_sft=None)}
    assert set(got) == {"copy", "sort", "(none)"}
    assert (got["copy"]["rows"], got["copy"]["diffusion_exact_match"], got["copy"]["ar_exact_match"]) == (
        2,
        0.5,
        1.0,
    )
    assert (got["sort"]["diffusion_exact_match"], got["(none)"]["ar_exact_match"]) == (0.0, 0.0)
    assert "ar_sft_exact_match" not in got["copy"]  # a model given as None is left out
    assert exact_match_by_task([None] * 2, refs[:2], diffusion=diff[:2]) == []  # Alpaca rows: no task


def test_length_buckets_and_pooling():
    count = np.array([1, 2, 3, 4, 7, 8, 0])
    nll = np.array([1.0, 4.0, 3.0, 8.0, 7.0, 8.0, 0.0])
    ar = nll / 2
    buckets = length_buckets(nll, ar, count)
    assert [b["label"] for b in buckets] == ["1", "2-3", "4-7", "8-15"]
    assert [b["rows"] for b in buckets] == [1, 2, 2, 1]  # the empty answer is left out
    assert buckets[1]["nll_bound"] == pytest.approx(7.0 / 5)
    assert buckets[1]["gap"] == pytest.approx(7.0 / 10)
    assert pooled(nll, count) == pytest.approx(31.0 / 25)


def test_validated_rows_reads_limit_val_batches_like_lightning():
    assert validated_rows({"trainer": {"limit_val_batches": 1}}, 16, 64) == 16
    assert validated_rows({"trainer": {"limit_val_batches": 2}}, 300, 64) == 128
    assert validated_rows({"trainer": {"limit_val_batches": 0.5}}, 300, 64) == 128  # int(5 * 0.5) batches
    assert validated_rows({"trainer": {"limit_val_batches": 1.0}}, 300, 64) == 300
    assert validated_rows({}, 300, 64) == 300


def test_default_steps_grid():
    assert default_steps_grid(SamplerConfig(gen_length=32, steps=32, block_length=8)) == [4, 8, 16, 32]
    assert default_steps_grid(SamplerConfig(gen_length=8, steps=8)) == [1, 2, 4, 8]


def test_out_dir_defaults(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert default_out_dir(ckpt) == tmp_path / "run"
    assert default_out_dir(tmp_path) == tmp_path / "eval"


def test_evaluate_yaml_lists_every_sampler_field():
    from dataclasses import fields

    from omegaconf import OmegaConf

    from diffllm.config.resolvers import compose

    cfg = compose(
        ["ckpt_path=x"], config_name="evaluate"
    )  # the node: cli/sampler_keep (diffllm/config/store.py)
    assert set(cfg.sampler) == {f.name for f in fields(SamplerConfig)}
    assert all(OmegaConf.is_missing(cfg.sampler, k) for k in cfg.sampler)


@pytest.mark.slow
def test_evaluate_a_multirun_folder_prints_one_table(tiny_run, tmp_path):
    from diffllm.cli.evaluate import evaluate_multirun, multirun_jobs

    for job in ("lora.r=2", "lora.r=4"):
        (tmp_path / job / "checkpoints").mkdir(parents=True)
        (tmp_path / job / "checkpoints" / "last.ckpt").symlink_to(tiny_run[1])
    (tmp_path / "not_a_job").mkdir()
    assert [p.parent.parent.name for p in multirun_jobs(tmp_path)] == ["lora.r=2", "lora.r=4"]
    results, table = evaluate_multirun(
        tmp_path, rows=4, gen_rows=2, steps_grid=[8], progress=False, quality_cfg={"enabled": False}
    )
    lines = table.read_text().splitlines()
    assert lines[2].startswith("| job | NLL bound | L2R NLL | AR NLL |") and len(lines) == 6
    for line, (job, r) in zip(lines[4:], results.items()):
        assert line.startswith(f"| {job} | {r['nll_bound']:.3f} ± {r['nll_bound_se']:.3f} |")
        assert (tmp_path / job / "eval.json").exists()  # each job's own report
    with pytest.raises(FileNotFoundError, match="no <job>/checkpoints/last.ckpt"):
        evaluate_multirun(tmp_path / "not_a_job")
