"""objective=ar (AR-SFT at equal budget): causal training step, its loss by hand, its checkpoint and
report; the end-of-run report's AR-SFT row and provenance."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from diffllm.config.resolvers import compose
from diffllm.diffusion.likelihood import ar_nll
from diffllm.evaluation.tables import format_report
from diffllm.model.attention import is_bidirectional, set_bidirectional
from diffllm.model.dlm import DiffusionLM
from diffllm.training.objectives import ARObjective, DiffusionObjective, objective_of
from tests.conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

EOS, MASK = 31, 32


def _dlm() -> DiffusionLM:
    """A converted tiny model (bidirectional, LoRA with nonzero B so the adapters matter), in train mode."""
    model = set_bidirectional(tiny_llama(33))
    model = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        ),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3, generator=torch.Generator().manual_seed(2))
    return DiffusionLM(model, mask_id=MASK, shift=True, attention="prefix_lm").train()


def _batch() -> dict[str, torch.Tensor]:
    """2 rows, prompt 3 tokens; row 0: answer 3..5 + EOS at 6 + EOS padding 7..8; row 1: answer 3..4 +
    EOS at 5 + padding EOS 6..7, then a pad position."""
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 30, (2, 9), generator=gen)
    input_ids[0, 6:] = EOS
    input_ids[1, 5:8] = EOS
    input_ids[1, 8] = 0
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8] = 0
    answer_mask = torch.zeros(2, 9, dtype=torch.bool)
    answer_mask[:, 3:] = True
    answer_mask[1, 8] = False
    score_mask = torch.zeros(2, 9, dtype=torch.bool)
    score_mask[0, 3:7] = True
    score_mask[1, 3:6] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "answer_mask": answer_mask,
        "score_mask": score_mask,
    }


def test_ar_loss_equals_a_hand_computed_next_token_ce_on_the_answer_span():
    dlm, batch = _dlm(), _batch()
    loss, stats = ARObjective().loss(SimpleNamespace(dlm=dlm), batch)

    # by hand: a causal copy of the adapted model, full logits, -log p(x_i | x_<i) on the answer + first EOS
    causal = set_bidirectional(copy.deepcopy(dlm.model), False)
    with torch.no_grad():
        logp = F.log_softmax(
            causal(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1
        )
    ids = batch["input_ids"]
    terms = [-logp[b, i - 1, ids[b, i]] for b, i in batch["score_mask"].nonzero().tolist()]
    assert len(terms) == 7 and int(stats["n_answer"]) == 7
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    # the EOS padding after the first end token is not trained on
    padded = [-logp[b, i - 1, ids[b, i]] for b, i in batch["answer_mask"].nonzero().tolist()]
    assert loss.item() != pytest.approx(torch.stack(padded).mean().item(), rel=1e-3)
    # it trains the adapters, and the model is bidirectional again after the step
    loss.backward()
    grads = [p.grad for n, p in dlm.model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert is_bidirectional(dlm.model)


def test_ar_training_step_is_causal_a_later_token_never_changes_an_earlier_logit():
    dlm, batch = _dlm(), _batch()
    captured: list[torch.Tensor] = []
    hook = dlm.lm_head.register_forward_hook(lambda m, i, out: captured.append(out.detach()))
    later = {**batch, "input_ids": batch["input_ids"].clone()}
    later["input_ids"][0, 5] = (later["input_ids"][0, 5] + 1) % 30  # the last answer token of row 0
    try:
        ARObjective().loss(SimpleNamespace(dlm=dlm), batch)
        ARObjective().loss(SimpleNamespace(dlm=dlm), later)
    finally:
        hook.remove()
    before, after = captured  # (7, V): row 0 from positions 2, 3, 4, 5; row 1 from 2, 3, 4
    torch.testing.assert_close(after[:3], before[:3])  # positions 2..4 of row 0 come before the change
    torch.testing.assert_close(after[4:], before[4:])  # row 1 is untouched
    assert not torch.allclose(after[3], before[3])  # position 5 sees its own new token
    # the same change reaches position 2 through the bidirectional (diffusion) attention
    with torch.no_grad():
        bi = [dlm.hidden_states(b["input_ids"], b["attention_mask"])[0, 2] for b in (batch, later)]
    assert not torch.allclose(bi[0], bi[1])


def test_objective_of_reads_the_registry_only():
    assert isinstance(
        objective_of({"objective": {"_target_": "diffllm.training.objectives.ARObjective"}}), ARObjective
    )
    assert isinstance(objective_of({}), DiffusionObjective)  # configs from before the objective group
    with pytest.raises(ValueError, match="os.system"):
        objective_of({"objective": {"_target_": "os.system"}})
    assert (
        compose(["objective=ar", "output_dir=/tmp/x"]).objective._target_
        == "diffllm.training.objectives.ARObjective"
    )


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_ar_run_validates_checkpoints_and_reports(tiny_ar_run):
    out, ckpt_path, metrics, objects = tiny_ar_run
    module, datamodule = objects["module"], objects["datamodule"]
    assert isinstance(module.objective, ARObjective)
    # its own NLL is its validation loss (same scored tokens, eval mode); no diffusion bound
    assert metrics["val/ar_sft_nll"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    assert {"val/ar_nll", "val/ar_nll_no_end", "val/exact_match"} <= set(metrics)
    assert "val/nll_bound" not in metrics
    # loadable like a diffusion checkpoint: the trainable weights and the config
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == {n for n, p in module.named_parameters() if p.requires_grad}
    assert ckpt["hyper_parameters"]["objective"]["_target_"] == "diffllm.training.objectives.ARObjective"
    from diffllm.inference.loading import load_for_inference
    from diffllm.training.checkpoints import load_ar_sft

    reloaded = load_ar_sft(ckpt_path, module.tokenizer)
    for name, p in module.dlm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(dict(reloaded.named_parameters())[name], p.cpu())
    with pytest.raises(ValueError, match="ar_ckpt_path="):  # not a diffusion model for the sampler
        load_for_inference(ckpt_path)

    report = json.loads((out / "report.json").read_text())
    assert report["objective"] == "AR-SFT" and "nll_bound" not in report
    for key in ("ar_sft_nll", "ar_nll", "ar_nll_no_end", "ar_sft_exact_match", "ar_base_exact_match"):
        assert key in report and f"{key}_se" in report, key
    # provenance: 6 steps over 16 rows in batches of 8 = 3 epochs, every row's tokens counted 3 times
    prov = report["provenance"]
    tokens = sum(len(r["input_ids"]) for r in datamodule.train_ds)
    assert len(datamodule.train_ds) == 16
    assert prov["tokens_seen"] == 3 * tokens == ckpt["diffllm"]["tokens_seen"]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
    ).stdout.strip()
    assert prov["git_commit"] == (head or None)
    for name in ("torch", "transformers", "peft", "lightning"):
        assert prov["versions"][name] == importlib.metadata.version(name)
    assert prov["device"] == "cpu" and 0 < prov["wall_seconds"] < 600


@pytest.mark.slow
def test_report_with_ar_ckpt_path_has_the_three_rows(tiny_run, tiny_ar_run):
    from diffllm.inference.loading import load_for_inference, run_datamodule
    from diffllm.training.checkpoints import load_ar_sft

    report = json.loads((tiny_run[0] / "report.json").read_text())
    assert report["ar_ckpt_path"] == str(tiny_ar_run[1])
    for key in ("nll_bound", "ar_sft_nll", "ar_nll", "ar_nll_no_end", "gap", "gap_sft"):
        assert key in report and report[f"{key}_se"] > 0, key
    assert report["gap_sft"] == pytest.approx(report["nll_bound"] - report["ar_sft_nll"])
    assert report["answer_tokens_no_end"] == report["answer_tokens"] - report["rows"]  # one end token per row
    for model in ("diffusion", "ar_sft", "ar_base"):
        for metric in ("exact_match", "rougeL", "answer_length", "eos_rate"):
            assert f"{model}_{metric}_se" in report, (model, metric)
    # renamed keys: the base model was "ar" in answers; the old names stay for one release, same values
    for metric in ("exact_match", "exact_match_se", "rougeL", "answer_length", "eos_rate", "nfe"):
        assert report[f"ar_{metric}"] == report[f"ar_base_{metric}"], metric
    assert report["ar_minus_ar_sft_exact_match"] == report["ar_base_minus_ar_sft_exact_match"]
    assert report["reference_free"]["ar"] == report["reference_free"]["ar_base"]
    assert [e["ar"] for e in report["examples"]] == [e["ar_base"] for e in report["examples"]]
    assert "diffusion_minus_ar_sft_exact_match" in report

    # the AR-SFT row is that checkpoint's causal NLL, adapters on, on the same tokens
    im = load_for_inference(tiny_run[1])
    ar_sft = load_ar_sft(tiny_ar_run[1], im.tokenizer)
    dm = run_datamodule(im.cfg, im.tokenizer)
    batch = dm.collate([dm.val_ds[i] for i in range(report["rows"])])
    nll, count = ar_nll(
        ar_sft, batch["input_ids"], batch["attention_mask"], batch["score_mask"], adapters=True
    )
    assert report["ar_sft_nll"] == pytest.approx((nll.sum() / count.sum()).item(), abs=1e-5)

    text = format_report(report)
    for label in (
        "diffusion, ELBO upper bound",
        "AR-SFT, same budget",
        "AR base, unadapted",
        "without the end token",
    ):
        assert label in text, label
    assert f"{report['ar_sft_nll']:.3f} ± {report['ar_sft_nll_se']:.3f}" in text

    # a diffusion checkpoint is refused as the AR-SFT baseline, naming the fix
    with pytest.raises(ValueError, match="objective=ar"):
        load_ar_sft(tiny_run[1], im.tokenizer)
