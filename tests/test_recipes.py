"""diffllm.bench.recipes: one AR-SFT per budget, finished recipes skipped, killed runs resumed from
their own checkpoint, and a table whose paired differences are the per-row ones of eval.json.

The fast tests drive the runner with a stand-in launcher that writes what a run writes (a
checkpoint, an eval.json); the slow test runs the real commands on the embedded tiny model and
kills one for real (SIGKILL, no checkpoint on the way out)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffllm.bench import recipes as rc
from tests.conftest import TINY_RUN

BLOCK4 = "model.attention=block_causal model.block_size=4 sampler.cache=block sampler.block_length=4"
REPO = Path(__file__).resolve().parent.parent


def write_list(path: Path, recipes: dict, base: str = "trainer.max_steps=6", eval: str = "rows=8") -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"base": base, "eval": eval, "recipes": recipes}))
    return path


def arg(argv: list[str], key: str) -> str | None:
    """The value of ``key=...`` in a command's arguments (the last one wins, as in Hydra)."""
    return next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith(f"{key}=")), None)


class FakeLauncher:
    """Stands in for ``python -m diffllm.train`` / ``diffllm.evaluate``: writes the files they write
    (config.yaml, checkpoints/last.ckpt at the run's max_steps, eval.json) and records every call."""

    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail  # run folder names whose training exits 1

    def __call__(self, argv: list[str], log: Path, env: dict) -> int:
        self.calls.append(list(argv))
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"]
        if argv[1] == "diffllm.train":
            folder = Path(arg(argv, "hydra.run.dir"))
            if folder.name in self.fail:
                return 1
            if (folder / "config.yaml").exists():  # what run_folder.check_run_folder enforces
                assert arg(argv, "ckpt_path") == str(folder / "checkpoints" / "last.ckpt")
            (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
            (folder / "config.yaml").write_text("x: 1\n")
            steps = int(arg(argv, "trainer.max_steps") or 600)
            torch.save({"global_step": steps}, folder / "checkpoints" / "last.ckpt")
            return 0
        run = Path(arg(argv, "ckpt_path")).parent.parent
        seed = sum(map(ord, run.name))
        (run / "eval.json").write_text(json.dumps(fake_eval(seed)))
        return 0

    def trainings(self) -> list[Path]:
        return [Path(arg(a, "hydra.run.dir")) for a in self.calls if a[1] == "diffllm.train"]


def fake_eval(seed: int) -> dict:
    """An eval.json with per-row figures and headline figures pooled from them (as the core does)."""
    from diffllm.evaluation.scoring import mean_se, ratio_mean_se

    g = np.random.default_rng(seed)
    n = g.integers(2, 9, size=12)
    diffusion, sft, l2r = n * g.uniform(0.5, 2, 12), n * g.uniform(0.1, 1, 12), n * g.uniform(0.3, 1.5, 12)
    dm, sm = g.integers(0, 2, 10).astype(float), g.integers(0, 2, 10).astype(float)
    r = {"rows": 12, "gen_rows": 10, "answer_tokens": int(n.sum()), "sampler": {"steps": 8}}
    for key, sums in (("nll_bound", diffusion), ("ar_sft_nll", sft), ("l2r_nll", l2r)):
        r[key], r[f"{key}_se"] = ratio_mean_se(sums, n)
    r["gap_sft"], r["gap_sft_se"] = ratio_mean_se(diffusion - sft, n)
    r["diffusion_exact_match"], r["ar_sft_exact_match"] = dm.mean(), sm.mean()
    em = mean_se(dm - sm)
    r["diffusion_minus_ar_sft_exact_match"], r["diffusion_minus_ar_sft_exact_match_se"] = em
    r["diffusion_tokens_per_pass"] = 1.5
    r["per_row"] = {
        "scored": {"tokens": n.tolist(), "diffusion": diffusion.tolist(), "ar_sft": sft.tolist()},
        "generated": {"diffusion_match": dm.tolist(), "ar_sft_match": sm.tolist()},
    }
    return r


def table_row(table: str, name: str) -> dict[str, str]:
    """{column header: cell} of the row whose first cell is ``name``."""
    rows = [
        [c.strip() for c in t.strip().strip("|").split("|")] for t in table.splitlines() if t.startswith("| ")
    ]
    head = next(r for r in rows if r[0] == "recipe")
    return dict(zip(head, next(r for r in rows if r[0] == name), strict=True))


def hand_figures(ev: dict) -> tuple[str, str]:
    """bound − AR-SFT and EM − AR-SFT, each ± SE, from eval.json's per-row figures alone."""
    s, g = ev["per_row"]["scored"], ev["per_row"]["generated"]
    n = np.asarray(s["tokens"], dtype=float)
    d = np.asarray(s["diffusion"]) - np.asarray(s["ar_sft"])
    gap, m = d.sum() / n.sum(), len(n)
    gap_se = np.sqrt(((d - gap * n) ** 2).sum() / (m * (m - 1))) / n.mean()
    em = np.asarray(g["diffusion_match"], dtype=float) - np.asarray(g["ar_sft_match"], dtype=float)
    em_se = em.std(ddof=1) / np.sqrt(len(em))
    return f"{gap:.3f} ± {gap_se:.3f}", f"{em.mean():.3f} ± {em_se:.3f}"


# ----------------------------------------------------------------------------------- the lists


def test_shipped_lists_train_one_ar_sft_per_budget_and_data(tmp_path):
    """A dry run of each staged list: every recipe's command carries the base, its shared keys and
    its overrides verbatim; AR-SFT is planned once per (base, shared): smollm2-task's 100-step
    recipes share one, its 200-step recipes another."""
    expected_ar = {"tiny": 1, "smollm2-task": 2, "smollm2-selfgen": 1, "smollm2-selfgen-40": 1}
    for name, n_ar in expected_ar.items():
        lst = rc.load_recipes(name)
        said: list[str] = []
        runner = rc.Runner(
            out=tmp_path / name,
            base=lst.base,
            eval=lst.eval,
            list_name=name,
            dry_run=True,
            launcher=lambda *a: pytest.fail("a dry run launched a command"),
            say=said.append,
        )
        for recipe in lst.recipes.values():
            runner.run_recipe(recipe, tmp_path / "results.jsonl")
        ar_lines = [s for s in said if s.startswith("[AR-SFT")]
        assert len(ar_lines) == n_ar, ar_lines
        assert all(" objective=ar " in s for s in ar_lines)
        for recipe in lst.recipes.values():
            line = next(s for s in said if s.startswith(f"[{recipe.name}] train: "))
            assert shlex.join((*lst.base, *recipe.shared, *recipe.overrides)) in line
            assert f"hydra.run.dir={tmp_path / name / recipe.name}" in line
        assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / name).exists()
    task = rc.load_recipes("smollm2-task")
    assert task.recipes["best_200"].shared == ("trainer.max_steps=200",)
    assert rc.ar_key(task.base, ()) != rc.ar_key(task.base, ("trainer.max_steps=200",))
    tiny = rc.load_recipes("tiny")
    # every option of issue 18 alone on block 4, and together; the SmolLM2 winner's three options
    for key in ("block_schedule", "clean_stream=causal", "ar_weight", "complementary", "distill_weight"):
        alone = [
            n
            for n, r in tiny.recipes.items()
            if any(key in o for o in r.overrides) and n != "best" and "combo" not in n
        ]
        assert len(alone) == 1 and any(key in o for o in tiny.recipes["best"].overrides), (key, alone)
    combo = " ".join(tiny.recipes["block4_combo"].overrides)
    assert all(k in combo for k in ("block_schedule", "clean_stream=causal", "ar_weight=1.0"))


def test_bad_lists_and_names_fail_with_one_line(tmp_path):
    with pytest.raises(rc.RecipeError, match="not a Hydra override"):
        rc.load_recipes(write_list(tmp_path / "a.yaml", {"x": "model.block_size 4"}))
    with pytest.raises(rc.RecipeError, match="must not|does not start"):
        rc.load_recipes(write_list(tmp_path / "b.yaml", {"ar-sft-x": ""}))
    with pytest.raises(
        rc.RecipeError, match="shipped lists: smollm2-selfgen, smollm2-selfgen-40, smollm2-task, tiny"
    ):
        rc.load_recipes("nope")
    lst = rc.load_recipes(write_list(tmp_path / "c.yaml", {"a": "", "b": ""}))
    with pytest.raises(rc.RecipeError, match="--only c: not in"):
        rc.select(lst, "a,c")
    assert [r.name for r in rc.select(lst, "b,a")] == ["b", "a"]


def test_extends_appends_to_the_parent_and_inherits_its_budget(tmp_path):
    lst = rc.load_recipes(
        write_list(
            tmp_path / "l.yaml",
            {
                "child": {"extends": "mid", "overrides": "loss.ar_weight=2.0", "eval": "gen_rows=4"},
                "mid": {"extends": "top", "overrides": "model.clean_stream=causal"},
                "top": {"overrides": BLOCK4, "shared": "trainer.max_steps=9", "eval": "rows=4"},
                "own_budget": {"extends": "top", "shared": ""},
            },
        )
    )
    # file order (write_list sorts the keys), parents before or after their children
    assert list(lst.recipes) == ["child", "mid", "own_budget", "top"]
    child = lst.recipes["child"]
    assert child.overrides == (*BLOCK4.split(), "model.clean_stream=causal", "loss.ar_weight=2.0")
    assert child.shared == ("trainer.max_steps=9",) and child.eval == ("rows=4", "gen_rows=4")
    assert lst.recipes["own_budget"].shared == () and lst.recipes["own_budget"].overrides == tuple(
        BLOCK4.split()
    )
    with pytest.raises(rc.RecipeError, match="extends 'nope', which is not a recipe"):
        rc.load_recipes(write_list(tmp_path / "a.yaml", {"x": {"extends": "nope"}}))
    with pytest.raises(rc.RecipeError, match=r"cycle \(x -> y -> x\)"):
        rc.load_recipes(write_list(tmp_path / "b.yaml", {"x": {"extends": "y"}, "y": {"extends": "x"}}))


def test_ar_sft_is_keyed_on_the_config_it_trains_with(tmp_path):
    """Bases that differ in diffusion keys only share one AR-SFT; any key AR-SFT reads gives another;
    a folder named by another key whose recorded overrides compose to the same config is reused."""
    smol = ("+experiment=smollm2", "trainer.max_steps=200")
    key = rc.ar_key(smol, ())
    assert (
        rc.ar_key(("+experiment=smollm2_prefix_lm", "trainer.max_steps=100"), ("trainer.max_steps=200",))
        == key
    )
    assert rc.ar_key((*smol, "time_sampler.eps=0.001", "loss.ar_weight=4.0", "sampler.steps=3"), ()) == key
    for changed in (
        "trainer.max_steps=100",
        "optimizer.lr=0.002",
        "data.batch_size=8",
        "lora.r=16",
        "seed=1",
        "sampler.gen_length=32",
    ):
        assert rc.ar_key((*smol, changed), ()) != key, changed
    out = tmp_path / "out"
    old = out / "ar-sft-0123456789"  # named by the string hash of an older runner
    recorded = ["objective=ar", "+experiment=smollm2_prefix_lm", "trainer.max_steps=200"]
    old.mkdir(parents=True)
    rc.write_json(old / rc.STATE, {"run_id": "r", "overrides": recorded, "attempts": [], "trained": True})
    other = out / "ar-sft-9876543210"
    other.mkdir()
    rc.write_json(other / rc.STATE, {"overrides": ["objective=ar", *smol, "optimizer.lr=0.002"]})
    run = rc.ar_run(out, smol[:1], rc.Recipe("r", (), smol[1:]))
    assert run.folder == old and run.overrides == tuple(recorded)
    fresh = ("+experiment=smollm2", "trainer.max_steps=50")  # no folder of its key: its own name
    assert rc.ar_run(out, fresh, rc.Recipe("r", ())).folder == out / f"ar-sft-{rc.ar_key(fresh, ())}"


def test_what_the_ar_key_ignores_does_not_change_the_ar_sft_weights(tiny_ar_run, tmp_path):
    """The claim ``ar_identity`` rests on: objective=ar trained with every ignored key changed (block
    attention, curriculum, causal clean stream, AR weight, clipped times, cosine schedule, sampler
    blocks) gives the same weights as the plain run, and the two share a key."""
    from diffllm.config.resolvers import compose
    from diffllm.training.run import train
    from tests.conftest import TINY_AR_RUN

    changed = [
        "model.attention=block_causal",
        "model.block_size=4",
        "model.block_schedule=[[0,1],[2,4]]",
        "model.clean_stream=causal",
        "loss.ar_weight=2.0",
        "time_sampler.eps=0.3",
        "schedule=cosine",
        "sampler.block_length=4",
        "sampler.cache=block",
    ]
    plain = [o for o in TINY_AR_RUN if o != "objective=ar"]
    assert rc.ar_key(tuple(plain), ()) == rc.ar_key((*plain, *changed), ())
    train(compose(TINY_AR_RUN + changed + [f"output_dir={tmp_path}"]))
    ours = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ref = torch.load(tiny_ar_run[1], map_location="cpu", weights_only=False)
    assert ours["global_step"] == ref["global_step"] > 0
    assert ours["state_dict"].keys() == ref["state_dict"].keys() and ref["state_dict"]
    for name, value in ref["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], value), name


def test_check_configs_names_the_recipe_whose_key_does_not_exist():
    ok = rc.Run("ok", Path("/x/ok"), tuple(BLOCK4.split()))
    bad = rc.Run("bad", Path("/x/bad"), ("model.no_such_key=1",))
    errors = rc.check_configs([ok, bad], {"ok": ["rows=8"], "bad_eval": ["no_such_eval_key=1"]})
    assert set(errors) == {"bad", "bad_eval"}
    assert "no_such_key" in errors["bad"] and "no_such_eval_key" in errors["bad_eval"]


# ----------------------------------------------------------------------------------- the runner


def test_ar_sft_once_then_everything_skipped(tmp_path, capsys):
    """Two recipes of one budget train AR-SFT once; a second invocation launches nothing and appends
    nothing; a third recipe with another budget gets its own AR-SFT."""
    lst = write_list(
        tmp_path / "l.yaml", {"a": "", "b": BLOCK4, "c": {"overrides": "", "shared": "trainer.max_steps=9"}}
    )
    out = tmp_path / "out"
    fake = FakeLauncher()
    assert (
        rc.main(["--recipes", str(lst), "--out", str(out), "--only", "a,b", "--no-check"], launcher=fake) == 0
    )
    trained = fake.trainings()
    ar = [p for p in trained if p.name.startswith("ar-sft-")]
    assert len(ar) == 1 and [p.name for p in trained] == [
        "a",
        ar[0].name,
        "b",
    ]  # the conversion, then the baseline it is scored against
    assert [c[1] for c in fake.calls].count("diffllm.evaluate") == 2
    lines = rc.read_results(out / "results.jsonl")
    assert [x["recipe"] for x in lines] == ["a", "b"]
    assert {x["ar_sft_dir"] for x in lines} == {str(ar[0])}
    assert all(
        arg(c, "ar_ckpt_path") == str(ar[0] / "checkpoints/last.ckpt")
        for c in fake.calls
        if c[1] == "diffllm.evaluate"
    )
    # the exact commands: the AR-SFT and training commands launched, with the thread setting
    b = lines[1]  # calls: a, AR-SFT, a's evaluation, b, b's evaluation
    assert b["commands"]["train"] == [rc.shown(fake.calls[3], 1)]
    assert b["commands"]["ar_sft_train"] == [rc.shown(fake.calls[1], 1)]
    assert b["commands"]["eval"] == rc.shown(fake.calls[4], 1)
    assert b["commands"]["train"][0].startswith(
        "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m diffllm.train "
    )

    again = FakeLauncher()
    assert (
        rc.main(["--recipes", str(lst), "--out", str(out), "--only", "a,b", "--no-check"], launcher=again)
        == 0
    )
    assert again.calls == [] and len(rc.read_results(out / "results.jsonl")) == 2

    third = FakeLauncher()
    assert rc.main(["--recipes", str(lst), "--out", str(out), "--no-check"], launcher=third) == 0
    assert [p.name for p in third.trainings()] == [
        "c",
        f"ar-sft-{rc.ar_key(('trainer.max_steps=6',), ('trainer.max_steps=9',))}",
    ]
    assert len(rc.read_results(out / "results.jsonl")) == 3


def test_baselines_trains_only_the_ar_sft_then_the_recipe_reuses_it(tmp_path):
    """--baselines trains each distinct AR-SFT of the selected recipes once and nothing else (no
    conversion, no evaluation, no results line); the recipe run afterwards reuses that baseline."""
    lst = write_list(
        tmp_path / "l.yaml",
        {"a": "", "b": BLOCK4, "c": {"overrides": "", "shared": "trainer.max_steps=9"}},
    )
    out = tmp_path / "out"
    fake = FakeLauncher()
    assert (
        rc.main(["--recipes", str(lst), "--out", str(out), "--no-check", "--baselines"], launcher=fake) == 0
    )
    keys = [
        rc.ar_key(("trainer.max_steps=6",), ()),
        rc.ar_key(("trainer.max_steps=6",), ("trainer.max_steps=9",)),
    ]
    assert [p.name for p in fake.trainings()] == [f"ar-sft-{k}" for k in keys]
    assert all(c[1] == "diffllm.train" and arg(c, "objective") == "ar" for c in fake.calls)
    assert not (out / "results.jsonl").exists() and not (out / "a").exists()

    then = FakeLauncher()
    assert (
        rc.main(["--recipes", str(lst), "--out", str(out), "--only", "a", "--no-check"], launcher=then) == 0
    )
    assert [p.name for p in then.trainings()] == ["a"]  # the baseline is not trained again


def test_a_killed_training_resumes_from_its_checkpoint(tmp_path):
    """A folder left by a killed runner (an attempt without an end, last.ckpt at step 3) is resumed
    from that checkpoint; its killed attempt counts until the checkpoint was written."""
    lst = rc.load_recipes(write_list(tmp_path / "l.yaml", {"a": ""}))
    out = tmp_path / "out"
    fake = FakeLauncher()
    runner = rc.Runner(
        out=out, base=lst.base, eval=lst.eval, list_name="l", launcher=fake, say=lambda s: None
    )
    run = rc.diffusion_run(out, lst.base, lst.recipes["a"])
    (run.folder / "checkpoints").mkdir(parents=True)
    (run.folder / "config.yaml").write_text("x: 1\n")
    torch.save({"global_step": 3}, run.folder / "checkpoints" / "last.ckpt")
    started = time.time() - 100
    os.utime(run.folder / "checkpoints" / "last.ckpt", (started + 40, started + 40))
    rc.write_json(
        run.folder / rc.STATE,
        {
            "run_id": "r1",
            "overrides": list(run.overrides),
            "attempts": [{"command": "first", "started": started}],
        },
    )
    line = runner.run_recipe(lst.recipes["a"], out / "results.jsonl")
    train = [c for c in fake.calls if c[1] == "diffllm.train" and arg(c, "hydra.run.dir") == str(run.folder)]
    assert len(train) == 1 and arg(train[0], "ckpt_path") == str(run.folder / "checkpoints" / "last.ckpt")
    state = rc.read_json(run.folder / rc.STATE)
    assert [a.get("resume_from_step") for a in state["attempts"]] == [None, 3]
    assert state["trained"] and line["train_attempts"] == 2 and line["commands"]["train"][0] == "first"
    assert state["train_seconds"] == pytest.approx(40 + state["attempts"][1]["seconds"], abs=1e-6)


def test_a_folder_killed_before_its_first_checkpoint_starts_again(tmp_path):
    lst = rc.load_recipes(write_list(tmp_path / "l.yaml", {"a": ""}))
    out = tmp_path / "out"
    run = rc.diffusion_run(out, lst.base, lst.recipes["a"])
    (run.folder / "logs").mkdir(parents=True)
    (run.folder / "config.yaml").write_text("x: 1\n")  # check_run_folder would refuse this folder
    fake = FakeLauncher()
    rc.Runner(
        out=out, base=lst.base, eval=lst.eval, list_name="l", launcher=fake, say=lambda s: None
    ).run_recipe(lst.recipes["a"], out / "results.jsonl")
    train = [c for c in fake.calls if arg(c, "hydra.run.dir") == str(run.folder)]
    assert len(train) == 1 and arg(train[0], "ckpt_path") is None  # FakeLauncher: config.yaml was gone


def test_a_folder_of_other_overrides_is_refused(tmp_path):
    lst = write_list(tmp_path / "l.yaml", {"a": ""})
    out = tmp_path / "out"
    assert rc.main(["--recipes", str(lst), "--out", str(out), "--no-check"], launcher=FakeLauncher()) == 0
    lst2 = write_list(tmp_path / "l.yaml", {"a": BLOCK4})
    (out / "a" / "eval.json").unlink()
    with pytest.raises(rc.RecipeError, match="holds a run with other overrides"):
        rc.Runner(
            out=out, base=("trainer.max_steps=6",), eval=(), list_name="l", launcher=FakeLauncher()
        ).ensure_trained(rc.diffusion_run(out, ("trainer.max_steps=6",), rc.load_recipes(lst2).recipes["a"]))


def test_failures_stop_the_list_unless_keep_going(tmp_path, capsys):
    lst = write_list(tmp_path / "l.yaml", {"a": "", "b": ""})
    out = tmp_path / "out"
    assert (
        rc.main(["--recipes", str(lst), "--out", str(out), "--no-check"], launcher=FakeLauncher(fail={"a"}))
        == 1
    )
    assert not (out / "b").exists() and "[a] training exited 1" in capsys.readouterr().err
    fake = FakeLauncher(fail={"a"})
    assert (
        rc.main(["--recipes", str(lst), "--out", str(out), "--no-check", "--keep-going"], launcher=fake) == 1
    )
    assert [x["recipe"] for x in rc.read_results(out / "results.jsonl")] == ["b"]


# ----------------------------------------------------------------------------------- the table


def test_table_is_rendered_from_results_alone_with_the_per_row_paired_differences(tmp_path, capsys):
    lst = write_list(tmp_path / "l.yaml", {"a": "", "b": BLOCK4})
    out = tmp_path / "out"
    assert rc.main(["--recipes", str(lst), "--out", str(out), "--no-check"], launcher=FakeLauncher()) == 0
    for name in ("a", "b"):  # the run folders are not read: the table is results.jsonl's
        (out / name / "eval.json").rename(out / name / "eval.kept.json")
    capsys.readouterr()
    assert rc.main(["--recipes", str(lst), "--out", str(out), "--table"], launcher=FakeLauncher()) == 0
    table = capsys.readouterr().out
    for name in ("a", "b"):
        ev = json.loads((out / name / "eval.kept.json").read_text())
        cells = table_row(table, name)
        gap, em = hand_figures(ev)
        assert cells["bound − AR-SFT"] == gap and cells["EM − AR-SFT"] == em
        assert cells["bound ± SE"] == f"{ev['nll_bound']:.3f} ± {ev['nll_bound_se']:.3f}"
        assert cells["tokens/pass"] == "1.50" and cells["rows / prompts"] == "12 / 10"
    ar = next(t for t in table.splitlines() if t.startswith("| AR-SFT `"))
    ev_b = json.loads((out / "b" / "eval.kept.json").read_text())
    assert f"{ev_b['ar_sft_nll']:.3f} ± {ev_b['ar_sft_nll_se']:.3f}" in ar
    # the same AR-SFT scored differently by two recipes: flagged (they were not evaluated alike)
    assert "did not use the same rows" in table


def test_the_table_keeps_the_latest_line_of_a_recipe(tmp_path):
    line = {"recipe": "a", "ar_key": "k", "figures": {"nll_bound": 1.0, "ar_sft_nll": 0.5}, "shared": []}
    table = rc.format_table(
        [line, {**line, "recipe": "b"}, {**line, "figures": {"nll_bound": 2.0, "ar_sft_nll": 0.5}}]
    )
    assert [r.split("|")[1].strip() for r in table.splitlines()[2:4]] == ["b", "a"]
    assert table_row(table, "a")["bound ± SE"] == "2.000" and "did not use" not in table


# ----------------------------------------------------------------------------------- for real


TINY_BASE = [o for o in TINY_RUN if not o.startswith(("trainer.max_steps", "trainer.val_every_n_steps"))] + [
    "trainer.max_steps=40",
    "trainer.val_every_n_steps=40",
    "trainer.num_sanity_val_steps=0",
]


@pytest.mark.slow
def test_real_runs_killed_and_resumed(tmp_path, monkeypatch, capsys):
    """The real commands on the tiny model (4 processes): the runner trains the recipe, then is
    SIGKILLed, with the AR-SFT training it runs, once that training has a checkpoint; the next
    invocation keeps the trained recipe, resumes AR-SFT from that very checkpoint (its step file
    untouched) to the end, then evaluates; a third launches nothing; the table's paired differences
    are eval.json's per-row ones."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    lst = write_list(
        tmp_path / "l.yaml",
        {"b": BLOCK4},
        base=" ".join(TINY_BASE),
        eval="rows=16 gen_rows=16 steps_grid=[] quality.enabled=false",
    )
    out = tmp_path / "out"
    args = ["--recipes", str(lst), "--out", str(out), "--ckpt-every", "2", "--threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffllm.bench.recipes", *args],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ar = out / f"ar-sft-{rc.ar_key(TINY_BASE, ())}"
    ar_last = ar / "checkpoints" / "last.ckpt"
    deadline = time.time() + 900
    while not ar_last.exists():
        assert proc.poll() is None, "the runner ended before AR-SFT wrote a checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = rc.checkpoint_step(ar_last)
    assert 2 <= killed_at < 40, "AR-SFT finished before it was killed: nothing to resume"
    kept = ar / "checkpoints" / f"step={killed_at:06d}.ckpt"
    kept_stat = kept.stat()
    assert rc.checkpoint_step(out / "b" / "checkpoints" / "last.ckpt") == 40  # the conversion came first
    assert not (out / "results.jsonl").exists()

    assert rc.main(args) == 0
    ar_state = rc.read_json(ar / rc.STATE)
    assert [a.get("resume_from_step") for a in ar_state["attempts"]] == [None, killed_at]
    assert ar_state["attempts"][1]["command"].endswith(f"ckpt_path={ar_last}")
    assert (
        rc.checkpoint_step(ar_last) == 40
        and rc.checkpoint_step(out / "b" / "checkpoints" / "last.ckpt") == 40
    )
    assert (kept.stat().st_mtime_ns, kept.stat().st_ino) == (kept_stat.st_mtime_ns, kept_stat.st_ino)
    (line,) = rc.read_results(out / "results.jsonl")
    assert line["recipe"] == "b" and line["ar_sft_dir"] == str(ar) and line["train_attempts"] == 1
    assert line["commands"]["ar_sft_train"] == [a["command"] for a in ar_state["attempts"]]

    capsys.readouterr()
    assert rc.main(args, launcher=lambda *a: pytest.fail("a finished list launched a command")) == 0
    table = capsys.readouterr().out
    assert len(rc.read_results(out / "results.jsonl")) == 1
    ev = json.loads((out / "b" / "eval.json").read_text())
    assert ev["provenance"]["device_name"].endswith(", 1 torch threads")  # --threads 1 reached it
    gap, em = hand_figures(ev)
    cells = table_row(table, "b")
    assert (cells["bound − AR-SFT"], cells["EM − AR-SFT"]) == (gap, em)
    assert cells["rows / prompts"] == "16 / 16"
    assert (
        table_row(table, f"AR-SFT `{line['ar_key']}` (the base budget)")["AR-SFT NLL"] == cells["AR-SFT NLL"]
    )


def test_the_agreement_column_appears_when_an_evaluation_measured_it():
    line = {"recipe": "a", "ar_key": "k", "figures": {"nll_bound": 1.0}, "shared": []}
    assert "agreement" not in rc.format_table([line])
    free = {"diffusion": {"ar_agreement": 0.25, "ar_agreement_se": 0.05}, "ar_sft": {"ar_agreement": 0.75}}
    table = rc.format_table([{**line, "figures": {"nll_bound": 1.0, "reference_free": free}}])
    assert table_row(table, "a")["agreement w/ AR base greedy"] == "0.250 ± 0.050"
    assert table_row(table, "AR-SFT `k` (the base budget)")["agreement w/ AR base greedy"] == "0.750"


def test_a_second_runner_waits_for_the_lock_and_takes_over_a_dead_ones(tmp_path):
    import threading

    folder = tmp_path / "f"
    folder.mkdir()
    holder = subprocess.Popen(["sleep", "0.5"])
    threading.Thread(target=holder.wait).start()  # reaped when it ends, as another runner would be
    (folder / rc.LOCK).write_text(str(holder.pid))
    said: list[str] = []
    with rc.folder_lock(folder, said.append, poll=0.05):
        assert holder.poll() is not None  # entered only once the holder had ended
        assert (folder / rc.LOCK).read_text() == str(os.getpid())
    assert len(said) == 1 and f"pid {holder.pid}" in said[0] and not (folder / rc.LOCK).exists()
    (folder / rc.LOCK).write_text(str(holder.pid))  # a dead runner's lock: taken over at once
    with rc.folder_lock(folder, said.append, poll=60):
        assert (folder / rc.LOCK).read_text() == str(os.getpid())
    assert len(said) == 1


def test_the_alpaca_agreement_columns_appear_when_an_evaluation_measured_them():
    line = {"recipe": "a", "ar_key": "k", "figures": {"nll_bound": 1.0}, "shared": []}
    assert "Alpaca" not in rc.format_table([line])
    models = {
        "diffusion": {
            "exact_match": 0.25,
            "exact_match_se": 0.05,
            "first_difference": 3.5,
            "first_difference_se": 0.5,
        },
        "ar_sft": {
            "exact_match": 0.75,
            "exact_match_se": 0.04,
            "first_difference": 9.0,
            "first_difference_se": 1.0,
        },
    }
    table = rc.format_table([{**line, "figures": {"nll_bound": 1.0, "agreement": {"models": models}}}])
    cells, baseline = table_row(table, "a"), table_row(table, "AR-SFT `k` (the base budget)")
    assert (cells["Alpaca: EM w/ base greedy"], cells["Alpaca: first diff (tokens)"]) == (
        "0.250 ± 0.050",
        "3.50 ± 0.50",
    )
    assert (baseline["Alpaca: EM w/ base greedy"], baseline["Alpaca: first diff (tokens)"]) == (
        "0.750 ± 0.040",
        "9.00 ± 1.00",
    )
    assert "agreement w/ AR base greedy" not in table  # the reference-free column: not measured here
