"""The generate CLI and API on the tiny run's checkpoint, and the sampler benchmark's table arithmetic."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from diffllm.bench.sampler import (
    AR,
    BLOCK_CACHED,
    CACHED,
    NAIVE,
    SCHEDULE,
    THRESHOLD,
    Measurement,
    _short,
    answer_tokens,
    build_table,
    check_goals,
    sampler_settings,
)
from diffllm.cli.support import set_keys
from diffllm.config.resolvers import CONF_DIR, compose
from diffllm.data.collate import truncate_at_eos
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.diffusion.trajectory import trajectories_from_json
from diffllm.inference.inputs import InputError, PromptRow, read_prompts_file

INSTRUCTION = "Reverse these words: lion fish ring house"
INPUT = "cat dog"
# temperature 1 so that the seed matters: the API must reproduce the CLI's draw, not just argmax
SAMPLING = ["sampler.temperature=1.0", "seed=3"]


# tiny models on 2 shared cores: OpenMP threads only add spin-wait overhead (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "diffllm.generate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def printed(stdout: str, label: str) -> list[str]:
    """The answers printed after ``label:``, continuation lines (indented under it) included."""
    from diffllm.inference.generation import LABEL_WIDTH

    out: list[str] = []
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(label + ":"):
            parts = [line[LABEL_WIDTH + 1 :]]
            for nxt in lines[i + 1 :]:
                if not nxt.startswith(" " * (LABEL_WIDTH + 1)):
                    break
                parts.append(nxt[LABEL_WIDTH + 1 :])
            out.append("\n".join(parts).strip())
    return out


@pytest.fixture(scope="module")
def cli_run(tiny_run, tmp_path_factory):
    """One CLI call with a trajectory file, the terminal trajectory and the AR answer."""
    _, ckpt, _ = tiny_run
    cwd = tmp_path_factory.mktemp("generate_cwd")
    proc = run_cli(
        f"ckpt_path={ckpt}",
        f"prompt={INSTRUCTION}",
        f"input={INPUT}",
        "trajectory=traj.json",
        "show_trajectory=true",
        "ar=true",
        *SAMPLING,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr
    return proc, cwd


@pytest.fixture(scope="module")
def model(tiny_run):
    from diffllm.inference.loading import load_for_inference

    return load_for_inference(tiny_run[1])


def test_cli_trajectory_file_matches_printed_answer(cli_run, model):
    from diffllm.data.template import render_prompt

    proc, cwd = cli_run
    assert sorted(os.listdir(cwd)) == ["traj.json"]  # no run folder, .hydra/ or log file
    (traj,) = trajectories_from_json((cwd / "traj.json").read_text())
    tok = model.tokenizer
    template = model.cfg["data"]["template"]
    prompt = render_prompt({"instruction": INSTRUCTION, "input": INPUT}, template)
    assert traj.prompt == tok(prompt, add_special_tokens=True)["input_ids"]  # the run's own template
    canvas = traj.final_canvas
    assert len(canvas) == model.sampler_config.gen_length
    assert traj.mask_id not in canvas
    assert sorted(traj.commit_step()) == list(range(len(canvas)))  # every position decided exactly once
    answer = tok.decode(truncate_at_eos(canvas, tok.eos_token_id), skip_special_tokens=True).strip()
    assert printed(proc.stdout, "diffusion") == [answer]
    # show_trajectory: one rendered line per recorded step
    steps = [line for line in proc.stdout.splitlines() if f"/{len(traj.steps)} b" in line.split("|")[0]]
    assert len(steps) == len(traj.steps)


def test_cli_ar_prints_both_answers(cli_run):
    proc, _ = cli_run
    lines = proc.stdout.splitlines()
    diffusion = [i for i, line in enumerate(lines) if line.startswith("diffusion:")]
    ar = [i for i, line in enumerate(lines) if line.startswith("ar:")]
    n_lines = len(printed(proc.stdout, "diffusion")[0].split("\n"))  # a multi-line answer is indented
    assert len(diffusion) == len(ar) == 1 and ar[0] == diffusion[0] + n_lines  # the AR answer right under it
    assert "forward passes: diffusion" in proc.stdout and ", ar " in proc.stdout


def test_api_matches_cli_for_the_same_seed(cli_run, model):
    from diffllm.inference.generation import generate_answers

    proc, cwd = cli_run
    kwargs = {"sampler_overrides": {"temperature": 1.0}, "trajectory": True, "ar": True}
    (row,) = generate_answers(model, [INSTRUCTION], [INPUT], seed=3, **kwargs)
    assert [row["answer"]] == printed(proc.stdout, "diffusion")
    assert [row["ar_answer"]] == printed(proc.stdout, "ar")
    (traj,) = trajectories_from_json((cwd / "traj.json").read_text())
    assert row["trajectory"].to_dict() == traj.to_dict()

    # the seed reaches the sampler: with random ordering the commit order changes with the seed
    # (tokens alone may not: a sharp model samples the same answer at temperature 1)
    def order(seed: int) -> list:
        (r,) = generate_answers(
            model,
            [INSTRUCTION],
            [INPUT],
            seed=seed,
            trajectory=True,
            sampler_overrides={"strategy": "random"},
        )
        return [step.committed for step in r["trajectory"].steps]

    first = order(3)
    assert first == order(3)
    assert any(order(seed) != first for seed in range(4, 10))


def test_cli_jsonl_prompts_file(tiny_run, tmp_path):
    rows = [
        {"instruction": "Repeat the words.", "input": "hat cat rock", "output": "hat cat rock"},
        {"instruction": "Reverse these words: lion fish ring house", "output": "house ring fish lion"},
        {"instruction": "Sort these words: snow car dog"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    proc = run_cli(f"ckpt_path={tiny_run[1]}", f"prompts_file={path}", "batch_size=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert printed(proc.stdout, "instruction") == [r["instruction"] for r in rows]
    assert printed(proc.stdout, "input") == ["hat cat rock"]
    assert printed(proc.stdout, "reference") == ["hat cat rock", "house ring fish lion"]
    assert len(printed(proc.stdout, "diffusion")) == 3
    assert "(2 batches of <= 2)" in proc.stdout
    assert "# exact match vs reference: diffusion " in proc.stdout and "/2" in proc.stdout


def test_read_prompts_file_plain_lines_and_jsonl(tmp_path):
    plain = tmp_path / "prompts.txt"
    plain.write_text("Reverse these words: a b\n\n  Sort these words: c a  \n")
    assert read_prompts_file(plain) == [
        PromptRow("Reverse these words: a b"),
        PromptRow("Sort these words: c a"),
    ]
    # JSONL is recognised by the first line even without the .jsonl suffix
    jsonl = tmp_path / "prompts.txt2"
    jsonl.write_text(
        '{"instruction": "Repeat the words.", "input": "a b", "output": "a b"}\n{"instruction": "x"}\n'
    )
    assert read_prompts_file(jsonl) == [PromptRow("Repeat the words.", "a b", "a b"), PromptRow("x")]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"instruction": "ok"}', "", '{"instruction": "broken"'], "line 3 is not valid JSON"),
        (['{"instruction": "ok"}', '["a list"]'], "line 2 is a JSON list"),
        (
            ['{"instruction": "ok"}', '{"input": "no instruction"}'],
            "line 2 has no (or an empty) 'instruction'",
        ),
        (['{"instruction": 7}'], "line 1: 'instruction' must be a string"),
    ],
)
def test_read_prompts_file_names_the_bad_line(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        read_prompts_file(path)
    assert str(path) in str(err.value)


def test_cli_bad_input_exits_2_with_a_clear_message(tiny_run, tmp_path):
    """The process contract once (exit status 2, one line, no traceback), then every other bad input
    through the same CLI body in-process (``InputError`` is what ``main`` turns into that exit)."""
    from diffllm.cli.generate import run

    ckpt = tiny_run[1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "fine"}\n{"instruction": "oops",\n')
    proc = run_cli(f"ckpt_path={ckpt}", f"prompts_file={bad}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in (str(bad), "line 2", "not valid JSON"):
        assert needle in proc.stderr, proc.stderr
    cases = [
        (["prompt=hi"], ["ckpt_path is missing", "ckpt_path="]),
        ([f"ckpt_path={tmp_path / 'nope.ckpt'}", "prompt=hi"], ["nope.ckpt", "does not exist"]),
        ([f"ckpt_path={ckpt}", f"prompts_file={tmp_path / 'absent.txt'}"], ["absent.txt", "does not exist"]),
        ([f"ckpt_path={ckpt}"], ["no prompt", "prompts_file="]),
    ]
    for args, needles in cases:
        with pytest.raises(InputError) as err:
            run(compose(args, config_name="generate"))
        for needle in needles:
            assert needle in str(err.value), (args, str(err.value))


def test_sampler_overrides_on_top_of_the_checkpoint():
    base = SamplerConfig(gen_length=8, steps=8, block_length=4)
    # a threshold drops the checkpoint's step count (unused with a threshold)
    assert base.with_overrides({"threshold": 0.9}) == dataclasses.replace(base, steps=None, threshold=0.9)
    assert base.with_overrides({"steps": 4}).steps == 4
    assert base.with_overrides(None) is base and base.with_overrides({}) is base
    with pytest.raises(ValueError, match=r"unknown sampler setting\(s\) \['stepz'\]"):
        base.with_overrides({"stepz": 4})
    with pytest.raises(ValueError, match="set steps <= 4"):
        base.with_overrides({"gen_length": 4})


def test_cli_sampler_node_keeps_the_checkpoint_value_for_missing_keys():
    node = OmegaConf.create({"steps": 4, "threshold": "???", "cache": "prefix", "_target_": "x"})
    assert set_keys(node) == {"steps": 4, "cache": "prefix"}
    assert set_keys({"steps": 4, "threshold": "???"}) == {"steps": 4}
    assert set_keys(None) == {}


def test_generate_yaml_lists_every_sampler_field():
    # generate's and evaluate's node, generated from the sampler's fields (diffllm.config.store)
    assert "cli/sampler_keep@sampler" in yaml.safe_load((CONF_DIR / "generate.yaml").read_text())["defaults"]
    sampler = compose(["ckpt_path=x"], config_name="generate").sampler
    assert list(sampler) == [f.name for f in dataclasses.fields(SamplerConfig)]
    assert all(OmegaConf.is_missing(sampler, k) for k in sampler)  # ??? = keep the checkpoint's value


def test_benchmark_table_ratios_and_goals():
    rows, g = 32, 256
    tokens = rows * g  # 8192 answer tokens per method (answers that fill the canvas)

    def m(method: str, seconds: float, em: float, nfe: int) -> Measurement:
        return Measurement(method, g, seconds, tokens, nfe, em, settings="s", rows=rows)

    runs = [
        m(NAIVE, 16.0, 0.50, 256),
        m(SCHEDULE, 8.0, 0.50, 64),
        m(CACHED, 2.0, 0.50, 20),
        m(AR, 4.0, 0.5, 9),
    ]
    table = build_table(runs, rows=rows, batch_size=32, threads=2, device="cpu")
    assert "batch size 32" in table.splitlines()[0]
    lines = {line.split("|")[2].strip(): line for line in table.splitlines() if line.startswith(f"| {g} |")}
    # tokens/s: naive 8192/16 = 512, schedule 1024, cached 4096, AR 2048
    assert "| 256 | 16.00 | 512 | 1.00× | 0.25× | 50.0 % |" in lines[NAIVE]
    assert "| 64 | 8.00 | 1,024 | 2.00× | 0.50× |" in lines[SCHEDULE]
    assert "| 20 | 2.00 | 4,096 | 8.00× | 2.00× |" in lines[CACHED]
    assert "| 9 | 4.00 | 2,048 | 4.00× | 1.00× |" in lines[AR]
    assert [goal.passed for goal in check_goals(runs)] == [True, True, True]

    # one row of 32 lost (3.1 points) misses the EM goal; 3x naive misses the speed goal
    slower = [r if r.method != CACHED else m(CACHED, 16 / 3, 0.50 - 1 / 32, 30) for r in runs]
    goals = check_goals(slower)
    assert [goal.passed for goal in goals] == [False, False, False]
    assert goals[0].value == "3.00×" and goals[1].value.startswith("+3.1 points")
    assert goals[2].line().startswith("- MISS:")

    # a naive sampler with no exact match leaves no quality to lose: the EM goal cannot be judged
    hopeless = [dataclasses.replace(r, exact_match=0.0) if r.method in (NAIVE, CACHED) else r for r in runs]
    assert check_goals(hopeless)[1].passed is None and check_goals(hopeless)[1].line().startswith("- N/A:")


def test_benchmark_counts_answer_tokens_through_the_end_token():
    # answers with the EOS removed; ended: the row produced its EOS within G
    assert answer_tokens([[5, 6, 7], [8], []], [True, True, True]) == 4 + 2 + 1
    assert answer_tokens([[5] * 16, [8]], [False, True]) == 16 + 2  # no EOS: all G positions count
    with pytest.raises(ValueError, match="2 answers but 1"):
        answer_tokens([[1], [2]], [True])
    # 32 rows of 3 tokens + EOS in 0.5 s, one batch of 6 forward passes: 256 answer tokens/s,
    # 4 / 6 tokens per forward (the canvas budget G does not enter)
    short = Measurement(CACHED, 256, 0.5, answer_tokens([[1, 2, 3]] * 32, [True] * 32), 6, 1.0, "s", rows=32)
    assert short.tokens_per_s == 256 and short.tokens_per_forward == pytest.approx(4 / 6)
    table = build_table([short], rows=32, batch_size=32, threads=1, device="cpu")
    assert "| answer tokens/s |" in table and "| 6 | 0.50 | 256 | – | – | 100.0 % | 0.67 |" in table


def test_benchmark_methods_differ_only_in_commits_and_cache():
    for g in (16, 64, 256):
        settings = {
            m: sampler_settings(m, g, block=16, future="hidden") for m in (NAIVE, SCHEDULE, THRESHOLD, CACHED)
        }
        configs = {m: SamplerConfig(**s) for m, s in settings.items()}  # each a valid sampler config
        assert {c.block_length for c in configs.values()} == {16}
        assert {c.future_blocks for c in configs.values()} == {"hidden"}
        assert configs[NAIVE].resolved_steps == g and configs[NAIVE].threshold is None  # one token per step
        assert not configs[NAIVE].fill_after_eos
        assert configs[SCHEDULE].resolved_steps == g // 4 and configs[SCHEDULE].fill_after_eos
        assert configs[THRESHOLD].threshold == configs[CACHED].threshold == 0.9
        assert (configs[THRESHOLD].cache, configs[CACHED].cache) == ("none", "prefix")
    # --threshold reaches every threshold row and only them, and the table's settings column names it
    for m in (THRESHOLD, CACHED, BLOCK_CACHED):
        assert sampler_settings(m, 64, block=4, tau=0.99)["threshold"] == 0.99
    assert sampler_settings(NAIVE, 64, block=4, tau=0.99)["threshold"] is None
    assert _short(BLOCK_CACHED, 64, sampler_settings(BLOCK_CACHED, 64, block=4, tau=0.99)).startswith(
        "τ 0.99, block 4"
    )
    # --strategy reaches every diffusion row, and the settings column names any but the default
    for m in (NAIVE, THRESHOLD, BLOCK_CACHED):
        assert sampler_settings(m, 64, block=4, strategy="left_to_right")["strategy"] == "left_to_right"
        assert (
            SamplerConfig(**sampler_settings(m, 64, block=4, strategy="left_to_right")).strategy
            == "left_to_right"
        )
    l2r = sampler_settings(BLOCK_CACHED, 64, block=4, tau=0.99, strategy="left_to_right")
    assert _short(BLOCK_CACHED, 64, l2r).startswith("τ 0.99, left_to_right, block 4")
    assert sampler_settings(NAIVE, 8, block=16)["block_length"] == 8  # a block never exceeds the canvas
    assert sampler_settings(CACHED, 64, block=64, future="visible")["future_blocks"] == "visible"
    with pytest.raises(ValueError, match="must divide"):
        sampler_settings(NAIVE, 24, block=16)


def test_merged_copy_matches_the_adapters_and_leaves_them_alone(model):
    import torch

    from diffllm.model.attention import is_bidirectional

    dlm = model.dlm
    before = {k: v.clone() for k, v in dlm.model.state_dict().items()}
    fast = dlm.merged_copy()
    assert not any("lora" in name for name, _ in fast.model.named_modules())  # plain linear layers
    assert is_bidirectional(fast.model)
    assert (fast.mask_id, fast.shift, fast.attention) == (dlm.mask_id, dlm.shift, dlm.attention)
    ids = torch.tensor([[1, 5, 9, dlm.mask_id, dlm.mask_id, 7]])
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), dlm(ids), atol=1e-5, rtol=1e-4)
    after = dlm.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_benchmark_picks_the_newest_default_run(tmp_path):
    from diffllm.bench.sampler import find_checkpoint

    assert find_checkpoint([tmp_path]) is None
    newer, older, sweep = (
        tmp_path / "outputs/2025-01-01/10-00-00/checkpoints/last.ckpt",
        tmp_path / "outputs/2025-01-02/09-00-00/checkpoints/last.ckpt",
        tmp_path / "outputs/ablation/schedule=cosine/checkpoints/last.ckpt",  # a sweep, not `make train`
    )
    for mtime, path in ((2_000_000, newer), (1_000_000, older), (3_000_000, sweep)):
        path.parent.mkdir(parents=True)
        path.write_text("")
        os.utime(path, (mtime, mtime))
    # the newest dated run by modification time (not by name); the even newer sweep is ignored
    assert find_checkpoint([tmp_path / "nowhere", tmp_path]) == newer


def test_ablation_table_reads_each_jobs_last_validation(tmp_path):
    from diffllm.bench.ablation import collect, parse_job_dir, to_markdown

    header = "epoch,step,train/loss,val/nll_bound,val/ar_nll,val/gap,val/exact_match\n"
    jobs = {
        "+experiment=ablation,loss=elbo,model.shift=True,schedule=linear": "0.9,0.1,0.8,0.5\n0.4,0.1,0.3,0.75\n",
        "+experiment=ablation,loss=elbo,model.shift=False,schedule=cosine": "2.0,0.1,1.9,0.0\n",
    }
    for name, vals in jobs.items():
        (tmp_path / name / "logs").mkdir(parents=True)
        rows = "".join(f"0,{i},,{v}" for i, v in enumerate(vals.splitlines(keepends=True)))
        (tmp_path / name / "logs" / "metrics.csv").write_text(header + "0,5,1.0,,,,\n" + rows)
    (tmp_path / "unfinished").mkdir()  # a job without metrics is left out, not an error
    assert parse_job_dir("+experiment=ablation,loss=elbo,schedule=linear") == {
        "+experiment": "ablation",
        "loss": "elbo",
        "schedule": "linear",
    }
    rows = {(r["schedule"], r["model.shift"]): r for r in collect(tmp_path)}
    assert set(rows) == {("linear", "True"), ("cosine", "False")}
    assert rows[("linear", "True")]["val/nll_bound"] == 0.4  # the last validation, not the first
    assert rows[("linear", "True")]["val/exact_match"] == 0.75
    md = to_markdown(list(rows.values())).splitlines()
    assert md[2].startswith("| linear | True | elbo | 0.400 | 0.100 | 0.300 | 0.750 |")  # lowest bound first
    assert md[3].startswith("| cosine | False | elbo | 2.000 |")
