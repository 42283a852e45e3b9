"""The export's model card: Hub metadata that ``huggingface_hub.ModelCard`` parses and that matches the
run, the run's figures, and the upload plan of ``push_to_hub`` (dry run, offline)."""

from __future__ import annotations

import json
import sys

import pytest
from huggingface_hub import ModelCard

from diffllm.cli.export import main
from diffllm.evaluation.tables import format_report
from diffllm.inference.export import export_model, upload_plan
from diffllm.inference.loading import load_for_inference
from diffllm.inference.model_card import base_model_info, card_metadata, model_card_text, report_of

pytestmark = pytest.mark.usefixtures("one_thread")


def _export_cli(*args: str) -> None:
    argv = sys.argv
    sys.argv = ["diffllm.export", *args]
    try:
        main()
    finally:
        sys.argv = argv


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("card_export")
    _export_cli(f"ckpt_path={tiny_run[1]}", f"out={out}")
    return out


def test_the_card_parses_and_its_metadata_is_the_runs(exported, tiny_run):
    card = ModelCard.load(exported / "README.md")
    report = json.loads((tiny_run[0] / "report.json").read_text())
    assert report_of(tiny_run[1]) == report
    # the tiny base is the project's own: no Hub id, so no base_model, and the card says why
    assert card.data.base_model is None and "not on the Hub" in card.text
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "peft"  # the export holds a PEFT adapter folder
    assert {"diffusion", "masked-diffusion", "diffllm", "attention-prefix_lm"} <= set(card.data.tags)
    # the figures are the report's, rendered by the report's own table (bound, AR-SFT and base rows)
    assert format_report(report) in card.text
    assert f"{report['nll_bound']:.3f} ± {report['nll_bound_se']:.3f}" in card.text
    assert "ar_sft_nll" in report and f"{report['ar_sft_nll']:.3f}" in card.text
    import torch

    steps = torch.load(tiny_run[1], map_location="cpu", weights_only=True)["global_step"]
    lora = json.loads((exported / "merged" / "diffllm.json").read_text())["lora"]
    assert (
        f"{steps} optimizer steps" in card.text and f"r={lora['r']}, alpha={lora['lora_alpha']}" in card.text
    )
    assert "runs them **causally**" in card.text and "load_exported" in card.text
    # PEFT's stub (base_model: a local path) is replaced by the same card for the adapter alone
    adapter = ModelCard.load(exported / "adapter" / "README.md")
    assert adapter.data.library_name == "peft" and adapter.data.base_model is None
    assert str(tiny_run[0]) not in (exported / "adapter" / "README.md").read_text().split("---")[1]


def test_known_bases_map_to_their_hub_ids(tmp_path):
    smollm2 = tmp_path / "smollm2-135m-instruct"
    smollm2.mkdir()
    (smollm2 / "diffllm_source.json").write_text(json.dumps({"file": "SmolLM2-135M-Instruct.Q4_1.gguf"}))
    info = base_model_info(str(smollm2))
    assert info["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "Q4_1" in info["note"]
    card = {"base_model": str(smollm2), "attention": "block_causal"}
    meta = card_metadata(card, ["adapter"])
    assert (
        meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        and meta["base_model_relation"] == "adapter"
    )
    assert meta["license"] == "apache-2.0" and "attention-block_causal" in meta["tags"]
    # a Hub id is kept; its licence is known for the project's recipes, and `license=` wins
    assert card_metadata({"base_model": "meta-llama/Llama-3.2-1B"}, ["merged"])["license"] == "llama3.2"
    assert card_metadata({"base_model": "meta-llama/Llama-3.2-1B"}, ["merged"], "mit")["license"] == "mit"
    # a local folder without a source file has no Hub id: base_model left out, and the card says so
    plain = tmp_path / "mine"
    plain.mkdir()
    text = model_card_text({"base_model": str(plain), "attention": "prefix_lm"}, ["merged"])
    parsed = ModelCard(text)
    assert parsed.data.base_model is None and parsed.data.library_name == "transformers"
    assert "left out" in parsed.text and "None were measured" in parsed.text


def test_a_dry_run_push_lists_every_exported_file_and_touches_no_network(exported, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(
        huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("a dry run must not reach the Hub")
    )
    plan = upload_plan(exported)
    files = sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file())
    assert [name for name, _ in plan] == files
    assert {
        "README.md",
        "adapter/README.md",
        "merged/diffllm.json",
        "adapter/adapter_model.safetensors",
    } <= set(files)
    capsys.readouterr()
    from diffllm.inference.export import push_to_hub

    assert push_to_hub(exported, "me/tiny", dry_run=True) == plan


def test_the_cli_dry_run_prints_the_plan(tiny_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(
        huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("a dry run must not reach the Hub")
    )
    out = tmp_path / "exp"
    _export_cli(
        f"ckpt_path={tiny_run[1]}",
        f"out={out}",
        "formats=[adapter]",
        "push_to_hub=me/tiny",
        "push_to_hub_dry_run=true",
    )
    printed = capsys.readouterr().out
    plan = upload_plan(out)
    assert f"would upload {len(plan)} files, {sum(s for _, s in plan):,} bytes to me/tiny:" in printed
    assert all(f"  {name}" in printed for name, _ in plan)
    assert (
        "base_model_relation" not in ModelCard.load(out / "README.md").data.to_dict()
    )  # local base: no relation


def test_a_checkpoint_without_a_report_says_so(tiny_run, tmp_path):
    im = load_for_inference(tiny_run[1])
    export_model(im, tmp_path / "e", ["merged"], source=str(tiny_run[1]))
    card = ModelCard.load(tmp_path / "e" / "README.md")
    assert "None were measured" in card.text and card.data.library_name == "transformers"
