"""Generation input: a prompt that does not fit the model's positions is refused or cut, never run;
a mistyped local model path is named as such (no hub advice)."""

from __future__ import annotations

import json

import pytest

from diffllm.data.prompt_fit import PromptTooLongError, context_limit, fit_prompts
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.inference.generation import generate_answers
from diffllm.inference.inputs import InputError
from diffllm.inference.loading import InferenceModel
from diffllm.model.dlm import DiffusionLM
from diffllm.model.load import ModelLoadError, build_diffusion_model, load_tokenizer, looks_like_local_path
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_prompts_refuses_or_cuts_from_the_left():
    prompts = [[1, 5, 6], [1, *range(10, 20)], [7, 8, 9, 10, 11, 12]]  # 3, 11 and 6 tokens
    with pytest.raises(
        PromptTooLongError, match=r"prompt 1 is 11 tokens.*12 positions leave room for 6 \(1 of 3"
    ):
        fit_prompts(prompts, gen_length=6, limit=12)
    fitted, n = fit_prompts(prompts, 6, 12, "truncate_left", bos_id=1)
    assert n == 1
    assert fitted == [[1, 5, 6], [1, 15, 16, 17, 18, 19], [7, 8, 9, 10, 11, 12]]  # BOS kept, last 5 tokens
    assert fit_prompts(prompts, 6, 12, "truncate_left")[0][1] == list(range(14, 20))  # no BOS to keep
    assert fit_prompts(prompts, 1, None) == (prompts, 0)  # a model without a position limit
    assert fit_prompts(prompts, 1, 12) == (prompts, 0)
    with pytest.raises(PromptTooLongError, match="sampler.gen_length=11 leaves 1 of the model's 12"):
        fit_prompts(prompts, 11, 12)
    with pytest.raises(PromptTooLongError, match="prompt_overflow='cut'"):
        fit_prompts(prompts, 6, 12, "cut")


@pytest.fixture(scope="module")
def small_model(tokenizer):
    """An untrained tiny diffusion model with 64 positions (conftest's tiny LLaMA)."""
    dlm = DiffusionLM(tiny_llama(len(tokenizer) + 1), mask_id=len(tokenizer), shift=True)
    return InferenceModel(
        dlm, tokenizer, SamplerConfig(gen_length=8, steps=8), cfg={"data": {"template": "short"}}
    )


def test_generate_refuses_a_prompt_past_the_models_positions(small_model):
    assert context_limit(small_model.dlm) == 64
    long = "copy " + "cat " * 60  # about 67 prompt tokens; 64 - 8 leave 56
    with pytest.raises(
        InputError, match=r"instruction 1 \('copy cat.*is \d+ tokens.*prompt_overflow=truncate_left"
    ):
        generate_answers(small_model, ["copy cat", long])
    rows = generate_answers(small_model, ["copy cat", long], prompt_overflow="truncate_left")
    assert [r["prompt_truncated"] for r in rows] == [False, True]
    # the cut prompt is what the sampler saw: its answer equals the answer to the kept tokens alone
    tok = small_model.tokenizer
    full = tok(rows[1]["prompt"])["input_ids"]
    kept = [full[0], *full[len(full) - 55 :]]
    from diffllm.diffusion.sampler import generate

    direct = generate(
        small_model.dlm,
        [kept],
        small_model.sampler_config,
        eos_id=small_model.eos_id,
        pad_id=tok.pad_token_id,
        seed=0,
    )
    assert rows[1]["answer_ids"] == direct.tokens[0]


@pytest.mark.parametrize("name", ["/no/such/dir/model", "./tiny_lama", "~/models/x", "runs/a/b"])
def test_local_paths_are_told_apart_from_hub_ids(name):
    assert looks_like_local_path(name)


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "meta-llama/Llama-3.2-1B"])
def test_hub_ids_are_not_paths(name):
    assert not looks_like_local_path(name)


def test_mistyped_local_model_path_names_the_nearest_folder(tiny_model_dir, tmp_path):
    folder = tiny_model_dir.rstrip("/")
    cut = folder.rindex("ll") + 1
    typo = folder[:cut] + folder[cut + 1 :]  # .../tiny_llama0 -> .../tiny_lama0
    with pytest.raises(ModelLoadError) as err:
        build_diffusion_model(typo, None)
    msg = str(err.value)
    assert msg == f"model.pretrained={typo!r}: no such folder: {typo}; did you mean {tiny_model_dir}?"
    assert "login" not in msg and "hub" not in msg
    with pytest.raises(ModelLoadError, match=r"no such folder: .*holds no folder named like 'zzz'"):
        load_tokenizer(str(tmp_path / "zzz" / "model"))


def test_evaluate_refuses_or_counts_prompts_past_the_models_positions(tiny_run, tmp_path):
    """The tiny model has 128 positions; with a 64-position canvas a 70-token prompt fits
    data.max_length=96 but not the sampler's context."""
    from diffllm.inference.evaluate import evaluate

    rows = [
        {"instruction": "Repeat these words: " + "cat " * 70, "input": "", "output": "cat"},
        {"instruction": "What is 2 + 3?", "input": "", "output": "5"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(
        data_path=path,
        sampler={"steps": 4, "gen_length": 64},
        steps_grid=[4],
        ar_baseline=False,
        progress=False,
    )
    with pytest.raises(
        PromptTooLongError, match=r"validation row 0 is \d+ tokens.*128 positions leave room for 64"
    ):
        evaluate(tiny_run[1], out_dir=tmp_path / "a", **kw)
    r = evaluate(tiny_run[1], out_dir=tmp_path / "b", prompt_overflow="truncate_left", **kw)
    assert r["gen_rows"] == 2 and r["prompts_truncated"] == 1


def test_report_cuts_and_counts_prompts_past_the_positions(tiny_ar_run):
    """The end-of-run report: a 120-position canvas leaves 8 of the tiny model's 128 positions, so
    every validation prompt is cut from the left and counted (or refused with ``error``)."""
    import dataclasses

    from diffllm.evaluation.report import build_report
    from diffllm.evaluation.tables import format_report

    module, datamodule = tiny_ar_run[3]["module"], tiny_ar_run[3]["datamodule"]
    saved = module.sampler_config
    module.sampler_config = dataclasses.replace(saved, gen_length=120, steps=None, block_length=None)
    try:
        longer = sum(len(p["prompt_ids"]) > 8 for p in datamodule.sample_prompts(2))
        kw = dict(num_rows=2, likelihood_samples=1)
        with pytest.raises(PromptTooLongError, match="report.prompt_overflow=truncate_left"):
            build_report(module, datamodule, prompt_overflow="error", **kw)
        report = build_report(module, datamodule, **kw)
    finally:
        module.sampler_config = saved
    assert longer == 2 and report["prompts_truncated"] == 2
    assert "generation, 2 prompts (2 cut from the left)" in format_report(report)
