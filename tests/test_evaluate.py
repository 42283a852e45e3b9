"""python -m diffllm.evaluate (diffllm.inference.evaluate -> diffllm.evaluation.eval_report): reproduces
the run's validation figures exactly, writes its report files; the tables and plots show the same
rows; a block-diffusion checkpoint evaluates with its default sweep."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from diffllm.cli.evaluate import main
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.evaluation.compare import exact_match_by_task
from diffllm.evaluation.eval_report import default_out_dir, length_buckets, pooled, validated_rows
from diffllm.evaluation.plots import quality_vs_steps_data
from diffllm.evaluation.sweep import default_steps
from diffllm.inference.evaluate import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# tiny models on 2 shared cores: OpenMP threads only add spin-wait overhead (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def run_main(*args: str) -> tuple[dict, str]:
    """``python -m diffllm.evaluate *args`` in-process; returns (eval.json, what it printed). A
    ``SystemExit`` (the CLI's exit 1 on an error) propagates."""
    argv = sys.argv
    sys.argv = ["diffllm.evaluate", *args, "progress=false"]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            main()
    finally:
        sys.argv = argv
    out = next(a.split("=", 1)[1] for a in args if a.startswith("out_dir="))
    return json.loads((Path(out) / "eval.json").read_text()), printed.getvalue()


@pytest.fixture(scope="module")
def cli_eval(tiny_run, tiny_ar_run, tmp_path_factory):
    """``python -m diffllm.evaluate ckpt_path=... ar_ckpt_path=... out_dir=... steps_grid=[2,8,16]``
    in-process; returns (out folder, eval.json, what it printed)."""
    out = tmp_path_factory.mktemp("eval")
    r, printed = run_main(
        f"ckpt_path={tiny_run[1]}",
        f"ar_ckpt_path={tiny_ar_run[1]}",
        f"out_dir={out}",
        "steps_grid=[2,8,16]",
        "quality.rows=8",
    )
    return out, r, printed


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
        ("ar_nll_no_end", "AR base, without the end token"),
        ("gap_sft", "bound - AR-SFT"),
        ("l2r_nll", "diffusion, left to right"),
    ):
        line = next(line for line in printed.splitlines() if label in line)
        assert f"{r[key]:.3f} ± {r[key + '_se']:.3f}" in line, line
    lines = printed.splitlines()
    header = next(line for line in lines if line.strip().startswith("metric"))
    assert header.split() == ["metric", "diffusion", "AR-SFT", "AR", "base"]
    em = next(line for line in lines if line.strip().startswith("exact match  "))
    for model in ("diffusion", "ar_sft", "ar_base"):
        assert f"{r[model + '_exact_match']:.3f} ± {r[model + '_exact_match_se']:.3f}" in em
    diff = next(line for line in lines if line.strip().startswith("exact match - AR-SFT"))
    assert f"{r['diffusion_minus_ar_sft_exact_match']:.3f}" in diff
    bleu = next(line for line in lines if line.strip().startswith("BLEU-4"))
    assert [f"{r[m + '_bleu']:.3f}" for m in ("diffusion", "ar_sft", "ar_base")] == bleu.split()[-3:]


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
    for key in (
        "diffusion_exact_match",
        "ar_base_exact_match",
        "diffusion_rougeL",
        "ar_base_rougeL",
        "ar_base_bleu",
    ):
        assert 0.0 <= r[key] <= 1.0, key
    assert r["gen_rows"] == 16 and len(r["examples"]) == 8
    # per task: the tiny rows carry a task; the tasks partition the generated rows and pool back
    tasks = r["by_task"]
    assert sum(t["rows"] for t in tasks) == r["gen_rows"] and len({t["task"] for t in tasks}) == len(tasks)
    assert {t["task"] for t in tasks} <= {"copy", "reverse", "sort", "add", "lookup", "count"}
    for side in ("diffusion", "ar_sft", "ar_base"):
        pooled_em = sum(t[f"{side}_exact_match"] * t["rows"] for t in tasks) / r["gen_rows"]
        assert pooled_em == pytest.approx(r[f"{side}_exact_match"])
    md = (out / "eval.md").read_text()
    assert f"| diffusion, ELBO upper bound | {r['nll_bound']:.3f} ± {r['nll_bound_se']:.3f} |" in md
    assert "| AR-SFT, same budget |" in md and "| task | rows | diffusion | AR-SFT | AR base |" in md
    assert "(steps=16 skipped" in md and "| 16 | — | skipped |" in md
    assert "## exact match by task" in md and f"| {tasks[0]['task']} | {tasks[0]['rows']} |" in md
    # the length table and its plot: every model scored, AR-SFT included
    assert (
        "| answer tokens | rows | tokens | NLL bound | AR NLL | AR-SFT NLL | L2R NLL | bound - AR | bound - AR-SFT |"
        in md
    )
    pooled_sft = sum(b["ar_sft_nll"] * b["tokens"] for b in buckets) / r["answer_tokens"]
    assert pooled_sft == pytest.approx(r["ar_sft_nll"])
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
    assert np.isnan(r["ar_nll"]) and np.isnan(r["ar_base_exact_match"])
    assert r["diffusion_nfe"] == 4 and r["steps_grid"][0]["exact_match"] == r["diffusion_exact_match"]


def test_by_task_groups_rows_and_skips_untagged_data():
    tasks = ["copy", "sort", "copy", None]
    refs, diff, ar = ["a", "b", "c", "d"], ["a", "x", "x", "d"], ["a", "b", "c", "x"]
    got = {t["task"]: t for t in exact_match_by_task(tasks, refs, diffusion=diff, ar_base=ar, ar_sft=None)}
    assert set(got) == {"copy", "sort", "(none)"}
    copy = got["copy"]
    assert (copy["rows"], copy["diffusion_exact_match"], copy["ar_base_exact_match"]) == (2, 0.5, 1.0)
    assert (got["sort"]["diffusion_exact_match"], got["(none)"]["ar_base_exact_match"]) == (0.0, 0.0)
    assert "ar_sft_exact_match" not in got["copy"]  # a model given as None is left out
    assert exact_match_by_task([None] * 2, refs[:2], diffusion=diff[:2]) == []  # Alpaca rows: no task


def test_length_buckets_and_pooling():
    count = np.array([1, 2, 3, 4, 7, 8, 0])
    nll = np.array([1.0, 4.0, 3.0, 8.0, 7.0, 8.0, 0.0])
    scores = {"tokens": count, "tokens_no_end": count - 1, "diffusion": nll, "ar_base": nll / 2}
    buckets = length_buckets({**scores, "ar_base_no_end": nll / 4})
    assert [b["label"] for b in buckets] == ["1", "2-3", "4-7", "8-15"]
    assert [b["rows"] for b in buckets] == [1, 2, 2, 1]  # the empty answer is left out
    assert buckets[1]["nll_bound"] == pytest.approx(7.0 / 5)
    assert buckets[1]["gap"] == pytest.approx(7.0 / 10)
    assert "ar_nll_no_end" not in buckets[1]  # counted on other tokens: not pooled per bucket
    assert "ar_sft_nll" not in buckets[1] and "gap_sft" not in buckets[1]  # no AR-SFT row scored
    with_sft = length_buckets({**scores, "ar_sft": nll - count * 0.25})
    assert with_sft[1]["ar_sft_nll"] == pytest.approx(7.0 / 5 - 0.25)
    assert with_sft[1]["gap_sft"] == pytest.approx(0.25)
    assert pooled(nll, count) == pytest.approx(31.0 / 25)


def test_validated_rows_reads_limit_val_batches_like_lightning():
    assert validated_rows({"trainer": {"limit_val_batches": 1}}, 16, 64) == 16
    assert validated_rows({"trainer": {"limit_val_batches": 2}}, 300, 64) == 128
    assert validated_rows({"trainer": {"limit_val_batches": 0.5}}, 300, 64) == 128  # int(5 * 0.5) batches
    assert validated_rows({"trainer": {"limit_val_batches": 1.0}}, 300, 64) == 300
    assert validated_rows({}, 300, 64) == 300


class _BlockModel:
    block_size = 4


def test_default_steps_are_the_ones_the_block_layout_allows():
    assert default_steps(SamplerConfig(gen_length=32, steps=32, block_length=8)) == [4, 8, 16, 32]
    assert default_steps(SamplerConfig(gen_length=8, steps=8)) == [1, 2, 4, 8]
    # a block model decodes its own blocks: 16 positions in blocks of 4 take multiples of 4 steps
    assert default_steps(SamplerConfig(gen_length=16, steps=16), _BlockModel()) == [4, 8, 16]
    assert default_steps(SamplerConfig(gen_length=32, steps=32), _BlockModel()) == [8, 16, 32]


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


def test_the_evaluate_node_is_the_arguments_of_evaluate():
    """The command line passes its node as is: every key of conf/evaluate.yaml but ckpt_path and
    out_dir is a keyword argument of ``evaluate`` with the same default."""
    import inspect

    from diffllm.cli.evaluate import arguments
    from diffllm.config.resolvers import compose

    kwargs = arguments(compose(["ckpt_path=x"], config_name="evaluate"))
    params = inspect.signature(evaluate).parameters
    assert set(kwargs) == set(params) - {"ckpt_path", "out_dir"}
    defaults = {k: p.default for k, p in params.items() if k in kwargs}
    assert {k: v for k, v in kwargs.items() if k not in ("likelihood", "quality", "sampler")} == {
        k: v for k, v in defaults.items() if k not in ("likelihood", "quality", "sampler")
    }
    assert kwargs["sampler"] == {}  # every sampler key keeps the checkpoint's value


@pytest.mark.slow
def test_evaluate_a_multirun_folder_prints_one_table(tiny_run, tmp_path):
    from diffllm.inference.evaluate import evaluate_multirun, multirun_jobs

    for job in ("lora.r=2", "lora.r=4"):
        (tmp_path / job / "checkpoints").mkdir(parents=True)
        (tmp_path / job / "checkpoints" / "last.ckpt").symlink_to(tiny_run[1])
    (tmp_path / "not_a_job").mkdir()
    assert [p.parent.parent.name for p in multirun_jobs(tmp_path)] == ["lora.r=2", "lora.r=4"]
    results, table = evaluate_multirun(
        tmp_path, rows=4, gen_rows=2, steps_grid=[8], progress=False, quality={"enabled": False}
    )
    lines = table.read_text().splitlines()
    assert lines[2].startswith("| job | NLL bound | L2R NLL | AR NLL |") and len(lines) == 6
    for line, (job, r) in zip(lines[4:], results.items()):
        assert line.startswith(f"| {job} | {r['nll_bound']:.3f} ± {r['nll_bound_se']:.3f} |")
        assert (tmp_path / job / "eval.json").exists()  # each job's own report
    with pytest.raises(FileNotFoundError, match="no <job>/checkpoints/last.ckpt"):
        evaluate_multirun(tmp_path / "not_a_job")


def test_the_plots_draw_the_rows_of_the_tables(cli_eval):
    """quality_vs_steps.png: a line per other model of the generation table (AR-SFT at its exact
    match, not only the unadapted base); nll_by_length.png: a bar per figure of the length table."""
    from diffllm.evaluation.plots import nll_by_length_data

    out, r, _ = cli_eval
    md = (out / "eval.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| metric |"))  # the generation table
    models = [c.strip() for c in header.strip("|").split("|")][1:]
    assert models == ["diffusion", "AR-SFT", "AR base"]
    data = quality_vs_steps_data(r)
    assert data["references"] == {
        "AR-SFT exact match": r["ar_sft_exact_match"],
        "AR-SFT ROUGE-L": r["ar_sft_rougeL"],
        "AR base exact match": r["ar_base_exact_match"],
        "AR base ROUGE-L": r["ar_base_rougeL"],
    }
    assert data["steps"] == [2, 8]  # steps=16 was skipped: no point drawn for it
    assert data["lines"]["diffusion exact match"] == [g["exact_match"] for g in r["steps_grid"]]
    bars = nll_by_length_data(r)["bars"]
    assert list(bars) == [
        "diffusion, ELBO upper bound",
        "AR base, unadapted",
        "AR-SFT, same budget",
        "diffusion, left to right (one order)",
    ]
    assert bars["AR-SFT, same budget"] == [b["ar_sft_nll"] for b in r["length_buckets"]]


def test_renamed_keys_keep_their_old_name_for_one_release(cli_eval):
    """The base model's rows are ``ar_base`` everywhere; eval.json writes each renamed key's old
    ``ar`` name right after it, with the same value (deprecated, one release)."""
    from diffllm.evaluation.names import deprecated_name

    out, r, _ = cli_eval
    renamed = [k for k in r if deprecated_name(k)]
    assert {
        "ar_base_exact_match",
        "ar_base_rougeL",
        "ar_base_bleu",
        "ar_base_minus_ar_sft_exact_match",
    } <= set(renamed)
    keys = list(r)
    for key in renamed:
        old = deprecated_name(key)
        assert r[old] == r[key] or (np.isnan(r[old]) and np.isnan(r[key]))
        assert keys.index(old) == keys.index(key) + 1, key  # beside the new key
    assert deprecated_name("ar_nll") is None and deprecated_name("ar_sft_exact_match") is None
    assert deprecated_name("diffusion_minus_ar_base_exact_match") == "diffusion_minus_ar_exact_match"
    assert all(e["ar"] == e["ar_base"] for e in r["examples"])
    assert all(t["ar_exact_match"] == t["ar_base_exact_match"] for t in r["by_task"])
    assert r["reference_free"]["ar"] == r["reference_free"]["ar_base"]
    scored, generated = r["per_row"]["scored"], r["per_row"]["generated"]
    assert scored["diffusion_l2r"] == scored["l2r_nll"]  # the score row's old name
    assert "ar" not in scored and "ar_no_end" not in scored  # score rows were always ar_base
    assert generated["ar_match"] == generated["ar_base_match"]
    text = (out / "eval.json").read_text()
    assert text.index('"ar_base_exact_match"') < text.index('"ar_exact_match"')


@pytest.fixture(scope="module")
def block_ckpt(tmp_path_factory):
    """A block-diffusion checkpoint (``+experiment=block_diffusion``: 16 answer positions in blocks of
    4), 3 steps of the tiny run, no report."""
    from diffllm.config.resolvers import compose
    from diffllm.training.run import train
    from tests.conftest import TINY_RUN

    out = tmp_path_factory.mktemp("block_run")
    extra = ["sampler.gen_length=16", "sampler.steps=16", "trainer.max_steps=3", "report.enabled=false"]
    train(compose(TINY_RUN + ["+experiment=block_diffusion", *extra, f"output_dir={out}"]))
    return out / "checkpoints" / "last.ckpt"


def test_evaluate_a_block_diffusion_checkpoint(block_ckpt, tmp_path):
    """``python -m diffllm.evaluate ckpt_path=<block checkpoint>`` exited 1 with "steps=2 cannot be
    spread evenly over 4 blocks": its default sweep (G/8 = 2) ignored the blocks. One sweep now
    serves both views, block-aware: the default steps are those the layout allows, and a count it
    refuses (8 tokens per step: steps=2) is reported with its reason."""
    r, printed = run_main(
        f"ckpt_path={block_ckpt}", f"out_dir={tmp_path}", "rows=4", "gen_rows=4", "quality.rows=4"
    )
    assert [g["steps"] for g in r["steps_grid"]] == [4, 8, 16] and r["steps_skipped"] == []
    at16 = r["steps_grid"][-1]  # the checkpoint's own sampler: steps=16, the headline answers
    assert (at16["exact_match"], at16["nfe"]) == (r["diffusion_exact_match"], r["diffusion_nfe"])
    qc = r["quality_vs_compute"]
    assert [(q["tokens_per_step"], q["steps"]) for q in qc] == [(1, 16), (2, 8), (4, 4), (8, 2)]
    assert "over 4 blocks" in qc[-1]["skipped"] and "nfe" not in qc[-1]
    assert qc[0]["exact_match"] == at16["exact_match"]  # the same sweep on the same 4 prompts
    assert 1 <= qc[2]["nfe"] <= qc[2]["steps"] == 4  # at most one forward pass per step (stop_early)
    assert "diffusion quality vs compute" in printed
