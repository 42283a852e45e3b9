"""The training benchmark on CPU: its rows, its batching, its counters and its table (not its speed)."""

from __future__ import annotations

import pytest
import torch

from diffllm.bench import train as bench
from diffllm.bench.histogram import load_histogram, sample_lengths
from diffllm.bench.wheelhouse import closure

pytestmark = pytest.mark.usefixtures("one_thread")

# A Llama-3.2-1B-shaped model (its vocabulary, GQA ratio, RoPE) shrunk to run in seconds on CPU.
SMALL = ["hidden_size=32", "intermediate_size=64", "num_hidden_layers=1", "num_attention_heads=4"]
SMALL += ["num_key_value_heads=1", "head_dim=8"]


def test_histogram_sampling_follows_the_counts():
    pairs, counts, provenance = load_histogram()
    assert provenance["rows"] == sum(counts) == 100
    drawn = sample_lengths(2000, seed=3)
    assert set(drawn) <= set(pairs)
    assert drawn == sample_lengths(2000, seed=3) != sample_lengths(2000, seed=4)


def test_alpaca_shaped_rows_are_laid_out_like_encode_row():
    rows = bench.alpaca_shaped_rows(50, vocab=1000, eos_id=7, answer_pad_to=64, max_length=512, seed=0)
    for row, (p, a) in zip(rows, sample_lengths(50, seed=0)):
        ids, ans, score = row["input_ids"], row["answer_mask"], row["score_mask"]
        span = min((a + 1) + (-(a + 1) % 64), 512 - p)
        assert len(ids) == len(ans) == len(score) == p + span
        assert ans == [0] * p + [1] * span
        assert sum(score) == min(a + 1, span) and score[:p] == [0] * p
        assert ids[p + min(a, span - 1) :] == [7] * (span - min(a, span - 1))  # EOS, then EOS padding


def test_length_grouping_cuts_padding_and_keeps_every_row_once():
    lengths = [len_p + len_a for len_p, len_a in sample_lengths(800, seed=1)]
    for grouped in (False, True):
        order = bench.batch_order(lengths, 16, grouped, seed=0)
        assert sorted(order) == list(range(800))

    def pad_share(order):
        batches = [order[i : i + 16] for i in range(0, 800, 16)]
        return 1 - sum(lengths) / sum(16 * max(lengths[i] for i in b) for b in batches)

    assert pad_share(bench.batch_order(lengths, 16, True, 0)) < 0.5 * pad_share(
        bench.batch_order(lengths, 16, False, 0)
    )


def test_build_table_ratios_and_failures():
    today = bench.Result(
        bench.Variant("today", grouped=False), 16, 4, steps=2, seconds=2.0, tokens=400, real_tokens=200
    )
    grouped = bench.Result(
        bench.Variant("grouped"), 16, 4, steps=2, seconds=1.0, tokens=210, real_tokens=200, peak_bytes=2**31
    )
    failed = bench.Result(bench.Variant("flex", mask="flex"), 16, 4, error="InductorError: no choices")
    table = bench.build_table([today, grouped, failed], flops_per_token=4e9, peak=1e15)
    rows = table.splitlines()
    assert "| today | 16 x 4 | 2 | 50.0 % | 100 | 200 | 0.0 % | n/a |" in rows[2]
    # 200 tokens/s x 4e9 FLOPs / 1e15 = 0.08 %; twice today's speed
    assert "| 200 (2.00x) | 210 | 0.1 % | 2.0 |" in rows[3]
    assert "failed: InductorError: no choices" in rows[4]


@pytest.mark.slow
def test_cpu_run_counts_tokens_and_probes_the_same_function(tmp_path):
    """The real path end to end: Lightning fits each variant from the same weights on the same probe."""
    out = tmp_path / "table.md"
    argv = ["--device", "cpu", "--model", "llama", "--arch", *SMALL, "--steps", "2", "--warmup", "1"]
    argv += ["--micro-batch", "4", "--accumulate", "2", "--variants", "today", "grouped", "padding mask"]
    table = bench.main(argv + ["--out", str(out)])
    assert out.read_text().strip() == table.strip()
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in table.splitlines()
        if line.startswith("| ")
    }
    assert (
        rows["today"][1] == "4 x 2" and rows["today"][2] == "2"
    )  # 2 timed optimizer steps of 2 micro-batches
    probe = {k: float(rows[k][-1].rstrip(" |")) for k in rows if k in ("today", "grouped", "padding mask")}
    assert probe["today"] == probe["grouped"]  # same weights, same batch, same attention: same loss
    assert probe["padding mask"] != probe["today"]  # the prompt now sees the canvas


def test_recipe_overrides_compose_the_experiments_final_step():
    from diffllm.bench.train import compose_run, recipe_overrides

    published = compose_run(recipe_overrides("prefix_lm", "llama"))
    recipe = compose_run(recipe_overrides("experiment", "llama"))
    assert published["model"]["attention"] == "prefix_lm" and not published["loss"]["complementary"]
    assert recipe["model"]["attention"] == "block_causal" and recipe["model"]["block_schedule"] is None
    assert (recipe["model"]["block_size"], recipe["model"]["clean_stream"]) == (4, "causal")
    assert recipe["loss"]["complementary"] and recipe["loss"]["ar_weight"] > 0
    tiny = compose_run(recipe_overrides("experiment", "tiny"))
    assert tiny["model"]["attention"] == "block_causal" and tiny["model"]["block_schedule"] is None
    assert compose_run(recipe_overrides("prefix_lm", "tiny"))["model"]["attention"] == "prefix_lm"
    with pytest.raises(ValueError, match="--recipe 'ar'"):
        recipe_overrides("ar", "llama")


@pytest.mark.slow
def test_the_recipe_step_is_timed_with_its_own_loss(tmp_path):
    """--recipe experiment fits the experiment's block-4 step: the probe is the recipe's loss (the
    same in both orders of rows), not the prefix-LM one, and the mask variants are refused."""
    argv = ["--device", "cpu", "--model", "llama", "--arch", *SMALL, "--steps", "1", "--warmup", "1"]
    argv += ["--micro-batch", "4", "--accumulate", "1"]
    table = bench.main(argv + ["--recipe", "experiment", "--variants", "today", "grouped"])
    assert "recipe experiment (block_causal, block 4)" in table
    probe = {
        line.split(" | ")[0].strip("| "): float(line.split(" | ")[-1].rstrip(" |"))
        for line in table.splitlines()
        if line.startswith("| ") and "variant" not in line and "---" not in line
    }
    assert probe["today"] == probe["grouped"]
    prefix = bench.main(argv + ["--variants", "today"])
    prefix_probe = float(
        next(line for line in prefix.splitlines() if line.startswith("| today")).split(" | ")[-1].rstrip(" |")
    )
    assert prefix_probe != probe["today"]
    with pytest.raises(SystemExit, match="padding mask"):
        bench.main(argv + ["--recipe", "experiment", "--variants", "padding mask"])


def test_timer_counts_exactly_the_timed_micro_batches():
    timer = bench.StepTimer(warmup_micro=2, sync=lambda: None)
    masks = [torch.ones(2, 5), torch.ones(2, 3), torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.ones(1, 4)]
    for i, m in enumerate(masks):
        timer.on_train_batch_end(None, None, None, {"attention_mask": m}, i)
    assert (timer.micro, timer.tokens, timer.real) == (2, 10, 7)
    assert timer.t1 >= timer.t0


def test_wheelhouse_closure_pins_the_project_but_not_torch():
    pins = closure()
    assert {"hydra-core", "omegaconf", "peft", "lightning", "transformers"} <= set(pins)
    assert not any(name == "torch" or name.startswith("nvidia-") for name in pins)
