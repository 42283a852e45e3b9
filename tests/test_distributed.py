"""Defect 7 (issue 10) and DDP on CPU: a step's gradient is that of one batch of all its rows.

The loss normaliser (answer, hidden or batch tokens) is summed over the step's micro-batches and
ranks, and the compensation for Lightning's 1/k and DDP's 1/W is exact: k micro-batches, or W
gloo ranks x k micro-batches, give the gradients (and losses, and weights after two AdamW steps)
of one process on the same global batch, to float rounding.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffllm.data.datamodule import Collator
from diffllm.diffusion.keys import DrawKeys
from tests.distributed_run import GLOBAL_BATCH, build_module, global_batches, run

pytestmark = pytest.mark.usefixtures("one_thread")

LOSSES = ["loss=elbo", "loss=elbo_hidden", "loss=elbo_batch"]  # answer, hidden, batch tokens
# + the AR term on a causal clean stream (loss.ar_weight): over the same global normaliser
AR_TERM = "model.attention=block_causal model.block_size=4 model.clean_stream=causal loss.ar_weight=0.5"
# + complementary masks (each row's pair in one sequence with one clean row): SmolLM2's recipe
PAIR = AR_TERM + " loss.complementary=true"


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def one_batch_gradient(override: str) -> tuple[float, dict[str, torch.Tensor]]:
    """By hand: the first global batch in one piece, grad of sum(weighted CE) / its count."""
    module = build_module(override.split())
    batch = Collator(module.tokenizer.pad_token_id)(global_batches(module.tokenizer)[0])
    keys = DrawKeys(seed=0, step=0, rows=range(GLOBAL_BATCH), global_batch_size=GLOBAL_BATCH)
    loss, stats = module.diffusion_loss(batch, keys=keys)
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("override", LOSSES + [AR_TERM, PAIR])
def test_accumulated_micro_batches_give_the_gradient_of_one_batch(override):
    loss, grads = one_batch_gradient(override)
    whole, halves = run(world=1, accumulate=1, overrides=override.split()), run(1, 2, override.split())
    assert whole["losses"][0] == pytest.approx(loss, rel=1e-6)
    assert halves["losses"] == pytest.approx(whole["losses"], rel=1e-6)
    assert_same(whole["grads"][0], grads)
    for step in range(2):
        assert_same(halves["grads"][step], whole["grads"][step])
    assert_same(halves["weights"], whole["weights"])
    # the figures compared are not trivially equal: the adapters moved, the steps differ
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert not torch.allclose(whole["grads"][0][next(iter(grads))], whole["grads"][1][next(iter(grads))])


@pytest.mark.slow
def test_two_gloo_ranks_with_accumulation_match_one_process(tmp_path):
    """Lightning DDP (strategy=ddp, 2 CPU processes, gloo) x 2 micro-batches == 1 process x 1 batch."""
    out = tmp_path / "ddp.pt"
    script = Path(__file__).with_name("distributed_run.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(out), "--world", "2", "--accumulate", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=False)
    single = run(world=1, accumulate=1)
    assert ddp["world_size"] == 2
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-6)
    for step in range(2):
        assert_same(ddp["grads"][step], single["grads"][step])
    assert_same(ddp["weights"], single["weights"])
