"""The scoring core: equal to the old likelihood paths, the end-token split, the SE formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from diffllm.diffusion.likelihood import ar_nll, elbo_nll, validation_seed
from diffllm.diffusion.schedule import LinearSchedule
from diffllm.evaluation.scoring import (
    Answers,
    binomial_se,
    end_token_mask,
    likelihood_figures,
    paired_difference,
    quality,
    ratio_mean_se,
    score_batch,
    score_rows,
    tokens_per_pass,
)
from diffllm.model.attention import set_bidirectional
from diffllm.model.dlm import DiffusionLM
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

EOS, MASK = 31, 32


def _dlm(lora_b_std: float = 0.0) -> DiffusionLM:
    model = set_bidirectional(tiny_llama(33))
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and lora_b_std:
                param.normal_(std=lora_b_std, generator=torch.Generator().manual_seed(5))
    return DiffusionLM(model, mask_id=MASK, shift=True).eval()


def _batch() -> dict[str, torch.Tensor]:
    """3 rows: prompt 3 tokens; answers of 3, 2 and 4 tokens + EOS, EOS-padded to 6; row 2 is cut
    by max_length before its EOS (no end token); row 1 is right-padded."""
    gen = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, 30, (3, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    answer_mask = torch.zeros(3, 9, dtype=torch.bool)
    score_mask = torch.zeros(3, 9, dtype=torch.bool)
    answer_mask[:, 3:] = True
    input_ids[0, 6:] = EOS  # answer 3..5, EOS at 6, padding 7..8
    score_mask[0, 3:7] = True
    input_ids[1, 5:8] = EOS  # answer 3..4, EOS at 5, padding 6..7, then a pad token
    input_ids[1, 8] = 0
    attention_mask[1, 8] = 0
    answer_mask[1, 8] = False
    score_mask[1, 3:6] = True
    score_mask[2, 3:] = True  # answer 3..8 truncated: no EOS scored
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "answer_mask": answer_mask,
        "score_mask": score_mask,
    }


def test_end_token_mask_marks_the_first_eos_and_skips_truncated_rows():
    b = _batch()
    end = end_token_mask(b["input_ids"], b["score_mask"], EOS)
    assert end.nonzero().tolist() == [[0, 6], [1, 5]]


def test_score_batch_equals_the_old_likelihood_paths():
    """The numbers validation, the report and evaluate computed before the scoring core."""
    dlm, b = _dlm(lora_b_std=0.3), _batch()
    seed = validation_seed(0, 3)
    got = score_batch(
        b, seed=seed, num_samples=3, method="grid", end_id=EOS, diffusion=dlm, ar_base=dlm, ar_sft=dlm
    )
    args = (dlm, b["input_ids"], b["attention_mask"])
    bound, count = elbo_nll(
        *args,
        b["answer_mask"],
        LinearSchedule(),
        num_samples=3,
        method="grid",
        seed=seed,
        score_mask=b["score_mask"],
    )
    ar, _ = ar_nll(*args, b["score_mask"])
    no_end = b["score_mask"].clone()
    no_end[0, 6] = no_end[1, 5] = False
    ar_no_end, count_no_end = ar_nll(*args, no_end)
    sft, _ = ar_nll(*args, b["score_mask"], adapters=True)
    assert torch.equal(got["diffusion"], bound)
    torch.testing.assert_close(got["ar_base"], ar)
    torch.testing.assert_close(got["ar_base_no_end"], ar_no_end)
    torch.testing.assert_close(got["ar_sft"], sft)
    assert got["tokens"].tolist() == count.tolist() == [4, 3, 6]
    assert got["tokens_no_end"].tolist() == count_no_end.tolist() == [3, 2, 6]
    # the adapters matter for AR-SFT and not for the base row
    assert not torch.allclose(got["ar_sft"], got["ar_base"])


def test_score_rows_seeds_batch_i_with_validation_seed():
    dlm, b = _dlm(), _batch()
    rows = score_rows(
        [b, b], seed=4, device="cpu", num_samples=2, method="stratified", end_id=EOS, diffusion=dlm
    )
    for i in range(2):
        one = score_batch(
            b, seed=validation_seed(4, i), num_samples=2, method="stratified", end_id=EOS, diffusion=dlm
        )
        np.testing.assert_allclose(rows["diffusion"][3 * i : 3 * i + 3], one["diffusion"].double().numpy())
    assert not np.allclose(rows["diffusion"][:3], rows["diffusion"][3:])  # two seeds, two mask draws


def test_ratio_mean_se_by_hand():
    # R = 9 / 6 = 1.5; residuals 0.5, 1, -1.5; SE = sqrt(3.5 / (3 * 2)) / mean(n) = sqrt(7 / 12) / 2
    mean, se = ratio_mean_se(np.array([2.0, 4.0, 3.0, 0.0]), np.array([1, 2, 3, 0]))  # empty row left out
    assert mean == pytest.approx(1.5)
    assert se == pytest.approx(math.sqrt(7 / 12) / 2)
    # equal per-row means: no spread, zero SE; one row: no SE
    assert ratio_mean_se(np.array([2.0, 4.0]), np.array([1, 2]))[1] == pytest.approx(0.0)
    assert math.isnan(ratio_mean_se(np.array([2.0]), np.array([1]))[1])


def test_likelihood_figures_pair_the_gaps_over_rows():
    scores = {
        "tokens": np.array([1, 2, 3]),
        "tokens_no_end": np.array([0, 1, 2]),
        "diffusion": np.array([3.0, 5.0, 6.0]),
        "ar_base": np.array([1.0, 1.0, 0.0]),
        "ar_base_no_end": np.array([0.0, 0.5, 0.0]),
        "ar_sft": np.array([2.0, 4.0, 5.0]),
    }
    f = likelihood_figures(scores)
    assert (f["answer_tokens"], f["answer_tokens_no_end"]) == (6, 3)
    assert f["nll_bound"] == pytest.approx(14 / 6) and f["ar_nll"] == pytest.approx(2 / 6)
    assert f["ar_nll_no_end"] == pytest.approx(0.5 / 3) and f["ar_sft_nll"] == pytest.approx(11 / 6)
    assert f["gap"] == pytest.approx(12 / 6) and f["gap_sft"] == pytest.approx(3 / 6)
    # AR-SFT is the bound minus one nat per row: the paired SE of that gap is the ratio SE of (1, 1, 1)
    assert f["gap_sft_se"] == pytest.approx(ratio_mean_se(np.ones(3), scores["tokens"])[1])
    assert f["ppl_bound"] == pytest.approx(math.exp(14 / 6))


def test_binomial_and_paired_exact_match_se_by_hand():
    assert binomial_se(0.75, 64) == pytest.approx(math.sqrt(0.75 * 0.25 / 64))
    assert binomial_se(1 / 64, 64) == pytest.approx(math.sqrt((1 / 64) * (63 / 64) / 64))
    refs = ["a", "b", "c", "d"]
    # matches A: 1 1 0 0, B: 1 0 1 0 -> d = 0 1 -1 0, mean 0, sd sqrt(2 / 3), SE sd / 2
    diff, se = paired_difference(["a", "b", "x", "x"], ["a", "x", "c", "x"], refs)
    assert diff == pytest.approx(0.0) and se == pytest.approx(math.sqrt(2 / 3) / 2)


def test_quality_reports_length_and_eos_rate_with_their_se():
    answers = Answers(
        texts=["a b", "c", "x y z", ""],
        lengths=[2, 1, 3, 6],
        ended=[True, True, True, False],
        seconds=1.0,
        nfe=5,
    )
    q = quality(answers, ["a b", "c", "d", "e"])
    assert q["exact_match"] == 0.5 and q["exact_match_se"] == pytest.approx(math.sqrt(0.25 / 4))
    assert q["answer_length"] == 3.0 and q["answer_length_se"] == pytest.approx(
        np.std([2, 1, 3, 6], ddof=1) / 2
    )
    assert q["eos_rate"] == 0.75 and q["eos_rate_se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert q["rougeL"] == pytest.approx(0.5)  # two exact, two with no common word
    assert (q["seconds"], q["nfe"]) == (1.0, 5)


def test_tokens_per_pass_counts_every_rows_share_of_a_batch_pass():
    # 3 rows decoded in one batch of 4 forward passes: 12 row-passes for 2 + 1 + 3 tokens and 2 end tokens
    answers = Answers(["", "", ""], [2, 1, 3], [True, True, False], 0.0, 4, row_passes=12)
    assert tokens_per_pass(answers) == pytest.approx((2 + 1 + 3 + 2) / 12)
    assert quality(answers, ["a", "b", "c"])["tokens_per_pass"] == pytest.approx(8 / 12)
    assert math.isnan(tokens_per_pass(Answers(["a"], [1], [True], 0.0, 1)))  # passes not counted


# ------------------------------------------------------------------------------------- one decode loop


def test_decode_answers_is_one_loop_over_batches(tokenizer):
    """``decode_answers`` on a fake decoder: batches of ``batch_size`` prompts in order, texts decoded,
    each row's batch passes, the end flag read from ``ended`` or, without it, from the canvas."""
    from types import SimpleNamespace

    from diffllm.evaluation.scoring import decode_answers

    eos, cat, dog = (
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("cat"),
        tokenizer.convert_tokens_to_ids("dog"),
    )
    seen = []

    def diffusion_like(
        prompts,
    ):  # answers [cat] * len(prompt); EOS on the 4-wide canvas of even-length prompts
        seen.append([len(p) for p in prompts])
        canvas = [([cat] * len(p) + [eos if len(p) % 2 == 0 else dog] + [dog] * 4)[:4] for p in prompts]
        return SimpleNamespace(
            tokens=[[cat] * len(p) for p in prompts], canvas=torch.tensor(canvas), nfe=10 * len(prompts)
        )

    prompts = [[1], [1, 2], [1, 2, 3]]
    out = decode_answers(diffusion_like, prompts, tokenizer, eos_id=eos, batch_size=2)
    assert seen == [[1, 2], [3]]  # two batches, in order
    assert out.texts == ["cat", "cat cat", "cat cat cat"] and out.lengths == [1, 2, 3]
    assert out.ended == [False, True, False]  # from the canvas: EOS after the even-length prompt only
    assert out.batch_nfe == [20, 20, 10] and out.nfe == 30 and out.row_passes == 50
    assert out.canvas == [[cat, dog, dog, dog], [cat, cat, eos, dog], [cat, cat, cat, dog]]
    assert out.trajectories is None

    def ar_like(prompts):
        return SimpleNamespace(tokens=[[dog] for _ in prompts], ended=[True] * len(prompts), nfe=1)

    out = decode_answers(ar_like, prompts, tokenizer, eos_id=eos, batch_size=3)
    assert out.ended == [True] * 3 and out.canvas is None and out.batch_nfe == [1, 1, 1] and out.nfe == 1


def test_answers_do_not_depend_on_the_batch_size(tokenizer):
    """The diffusion sampler and greedy AR decoding through the one loop: rows never interact."""
    from diffllm.diffusion.sampler import SamplerConfig
    from diffllm.evaluation.scoring import ar_answers, diffusion_answers

    dlm = _dlm(lora_b_std=0.3)
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10]]
    config = SamplerConfig(gen_length=4, steps=4)
    one = diffusion_answers(
        dlm, tokenizer, prompts, config, eos_id=EOS, seed=0, batch_size=1, trajectory=True
    )
    all3 = diffusion_answers(dlm, tokenizer, prompts, config, eos_id=EOS, seed=0, batch_size=3)
    assert one.tokens == all3.tokens and one.canvas == all3.canvas and one.ended == all3.ended
    assert [t.final_canvas for t in one.trajectories] == one.canvas and all3.trajectories is None
    ar1 = ar_answers(dlm, tokenizer, prompts, 4, eos_id=EOS, batch_size=1)
    ar3 = ar_answers(dlm, tokenizer, prompts, 4, eos_id=EOS, batch_size=3)
    assert ar1.tokens == ar3.tokens and ar1.ended == ar3.ended and sum(ar1.lengths) > 0
