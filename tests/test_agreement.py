"""diffllm.evaluation.agreement: how close a model's greedy answers stay to the base model's."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diffllm.assets import ALPACA_SAMPLE, TINY_AR_BASE, TINY_TEMPLATE, TINY_VAL
from diffllm.config.resolvers import compose
from diffllm.data.reader import parse_file
from diffllm.data.template import end_of_answer_id, get_format
from diffllm.diffusion.sampler import SamplerConfig
from diffllm.evaluation.agreement import (
    agreement,
    agreement_on_file,
    agreement_table,
    first_difference,
    paired_agreement,
)
from diffllm.evaluation.names import with_deprecated_keys
from diffllm.evaluation.scoring import Answers
from diffllm.evaluation.tables import agreement_with_base_table, render
from diffllm.model.load import build_diffusion_model

pytestmark = pytest.mark.usefixtures("one_thread")


def answers(texts, tokens) -> Answers:
    return Answers(
        list(texts), [len(t) for t in tokens], [True] * len(texts), 0.0, 0, [list(t) for t in tokens]
    )


@pytest.mark.parametrize(
    "a, b, position",
    [
        ([1, 2, 3], [1, 2, 3], 3),  # equal: the answer's length
        ([1, 2, 3], [1, 9, 3], 1),
        ([5], [6], 0),
        ([1, 2], [1, 2, 3], 2),  # a prefix: where the shorter one ended
        ([1, 2, 3], [1, 2], 2),
        ([], [], 0),
        ([], [4], 0),
    ],
)
def test_first_difference(a, b, position):
    assert first_difference(a, b) == position == first_difference(b, a)


# Four prompts: the base's answers, and a model whose answers share 3, 1, 2 and 0 leading tokens
# with them; texts 0 and 1 match after whitespace normalisation (1 differs in a token that is only
# whitespace), text 2 is a prefix of the base's, text 3 differs.
BASE = answers(["a b c", "x y", "p q r", "m"], [[1, 2, 3], [7, 8], [4, 5, 6], [9]])
MODEL = answers(["a  b c", "x \n y", "p q", "n"], [[1, 2, 3], [7, 0, 8], [4, 5], [10]])
SFT = answers(["a b c", "x y", "p q r", "z"], [[1, 2, 3], [7, 8], [4, 5, 6], [11]])


def test_agreement_by_hand():
    r = agreement(MODEL, BASE)
    positions = np.array([3, 1, 2, 0])
    assert r["rows"] == 4 and r["exact_match"] == 0.5
    assert r["exact_match_se"] == pytest.approx(math.sqrt(0.5 * 0.5 / 4))
    assert r["first_difference"] == 1.5
    assert r["first_difference_se"] == pytest.approx(positions.std(ddof=1) / 2)
    assert r["answer_length"] == pytest.approx(9 / 4)
    same = agreement(BASE, BASE)  # the base agrees with itself fully
    assert same["exact_match"] == 1.0 and same["first_difference"] == same["answer_length"] == 9 / 4


def test_paired_difference_and_table():
    d = paired_agreement(MODEL, SFT, BASE)  # SFT: 3 exact matches, positions 3, 2, 3, 0
    em_diff, first_diff = np.array([0, 0, -1, 0]), np.array([0, -1, -1, 0])
    assert d["exact_match"] == -0.25 and d["exact_match_se"] == pytest.approx(em_diff.std(ddof=1) / 2)
    assert d["first_difference"] == -0.5 and d["first_difference_se"] == pytest.approx(
        first_diff.std(ddof=1) / 2
    )
    table = agreement_table({"diffusion": MODEL, "ar_sft": SFT, "ar_base": BASE})
    assert set(table["models"]) == {"diffusion", "ar_sft"} and table["diffusion_minus_ar_sft"] == d
    assert table["models"]["ar_sft"]["exact_match"] == 0.75 and table["base_answer_length"] == 9 / 4
    shown = agreement_with_base_table({"agreement": {**table, "rows": 4, "file": "f.json", "gen_length": 8}})
    assert [row[0] for row in shown.rows] == [
        "diffusion",
        "AR-SFT",
        "diffusion - AR-SFT (paired)",
        "AR base (its own greedy answers)",
    ]
    text = "\n".join(render([shown]))
    assert "0.500 ± 0.250" in text and "-0.250 ±" in text and "+0.000" not in text
    assert shown.rows[-1][-1] == "2.25"  # the base's mean answer tokens, 9 / 4


def test_bad_inputs():
    with pytest.raises(ValueError, match="no answers of the base model"):
        agreement_table({"diffusion": MODEL})
    with pytest.raises(ValueError, match="answers of different lengths"):
        agreement(answers(["a"], [[1]]), BASE)


def test_the_shipped_alpaca_sample_reads_and_resolves():
    rows, rejected = parse_file(ALPACA_SAMPLE)
    assert len(rows) == 100 and rejected == [] and sum(bool(r["input"]) for r in rows) == 46
    assert rows[1]["instruction"] == "What are the three primary colors?"
    cfg = compose(
        ["ckpt_path=x", "agreement_file=${asset:alpaca/alpaca_sample.json}"], config_name="evaluate"
    )
    assert cfg.agreement_file == str(ALPACA_SAMPLE)
    from diffllm.cli.evaluate import arguments  # what the command passes on: resolved, not the text

    assert arguments(cfg)["agreement_file"] == str(ALPACA_SAMPLE)


def test_a_model_equal_to_the_base_agrees_fully(tmp_path):
    """LoRA at its initial state (B = 0) with the adapters on is the base model: AR-SFT's slot
    filled by it agrees on every prompt, to the last token; the paired row is diffusion minus it."""
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    dlm, tok = build_diffusion_model(str(TINY_AR_BASE), lora, attention="bidirectional")
    dlm.eval()
    rows = [json.loads(line) for line in TINY_VAL.read_text().splitlines()[:6]]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = agreement_on_file(
        path,
        prompt_format=get_format(TINY_TEMPLATE),
        tokenizer=tok,
        eos_id=end_of_answer_id(tok, TINY_TEMPLATE),
        config=SamplerConfig(gen_length=8),
        seed=0,
        batch_size=4,
        base=dlm,
        diffusion=dlm,
        ar_sft=dlm,
    )
    sft, diffusion = r["models"]["ar_sft"], r["models"]["diffusion"]
    assert r["rows"] == 6 and r["gen_length"] == 8 and r["prompts_truncated"] == 0
    assert sft["exact_match"] == 1.0 and sft["first_difference"] == sft["answer_length"] > 0
    assert r["diffusion_minus_ar_sft"]["exact_match"] == pytest.approx(diffusion["exact_match"] - 1.0)
    assert [e["instruction"] for e in r["examples"]] == [row["instruction"] for row in rows[:3]]
    assert all(e["ar_sft"] == e["ar_base"] for e in r["examples"])


def test_evaluate_records_the_agreement(tiny_run, tiny_ar_run, tmp_path):
    """``evaluate(..., agreement_file=...)``: eval.json's ``agreement`` is ``agreement_on_file`` on the
    checkpoint, its AR-SFT checkpoint and its base, and eval.md shows the table."""
    from diffllm.inference.evaluate import evaluate
    from diffllm.inference.loading import load_for_inference
    from diffllm.training.checkpoints import load_ar_sft

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(line + "\n" for line in TINY_VAL.read_text().splitlines()[20:26]))
    result = evaluate(
        tiny_run[1],
        ar_ckpt_path=tiny_ar_run[1],
        out_dir=tmp_path / "eval",
        rows=4,
        steps_grid=[16],
        progress=False,
        l2r_nll=False,
        quality={"enabled": False},
        agreement_file=path,
    )
    im = load_for_inference(tiny_run[1])
    expected = agreement_on_file(
        path,
        prompt_format=get_format(im.template),
        tokenizer=im.tokenizer,
        eos_id=im.eos_id,
        config=im.sampler_config,
        seed=0,
        batch_size=16,
        base=im.dlm,
        diffusion=im.dlm,
        ar_sft=load_ar_sft(tiny_ar_run[1], im.tokenizer),
    )
    # eval.json writes the renamed keys' old names beside them (the examples' base answers: ar)
    assert result["agreement"] == with_deprecated_keys(expected, "agreement") and expected["rows"] == 6
    assert all(e["ar"] == e["ar_base"] for e in result["agreement"]["examples"])
    assert set(expected["models"]) == {"diffusion", "ar_sft"} and "diffusion_minus_ar_sft" in expected
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert (
        "## Agreement with the base model" in md
        and f"{expected['models']['ar_sft']['exact_match']:.3f} ±" in md
    )
