"""One training run of the embedded default on fixed global batches, cut into ranks x micro-batches.

Used in-process by ``tests/test_distributed.py`` (accumulation) and as a script for Lightning DDP
on CPU (gloo), which relaunches this file once per extra rank:

    python tests/distributed_run.py OUT.pt --world 2 --accumulate 2

Each optimizer step takes one global batch of ``GLOBAL_BATCH`` rows, formed first and then dealt
out in ``DistributedSampler``'s order (rank r's m-th micro-batch holds global rows (m*B + i)*W + r,
``diffllm.diffusion.keys.global_row_index``). Rank 0 saves, per step, the gradients the optimizer
receives and the step's loss, and the trainable weights at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

GLOBAL_BATCH = 8
STEPS = 2


def build_module(overrides: list[str] | None = None, cls: type | None = None):
    """The embedded default, LoRA dropout 0 (its masks are not keyed per row), seeded init."""
    from diffllm.config.resolvers import compose
    from diffllm.training.module import DiffusionLitModule

    cfg = compose(["lora.lora_dropout=0", "output_dir=unused"] + (overrides or []))
    torch.manual_seed(0)
    return (cls or DiffusionLitModule).from_run_config(cfg)


def global_batches(
    tokenizer, steps: int = STEPS, size: int = GLOBAL_BATCH, seed: int = 0
) -> list[list[dict]]:
    """``steps`` global batches of encoded rows (random tokens, prompts and answers of varied length)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer) - 1  # keep clear of the added [MASK] id
    batches = []
    for _ in range(steps):
        rows = []
        for _ in range(size):
            n = int(torch.randint(8, 40, (1,), generator=gen))
            prompt = int(torch.randint(2, n - 3, (1,), generator=gen))
            ids = torch.randint(5, vocab, (n,), generator=gen).tolist()
            rows.append({"input_ids": ids, "answer_mask": [0] * prompt + [1] * (n - prompt)})
        batches.append(rows)
    return batches


def rank_micro_batches(
    batches: list[list[dict]], pad_id: int, world: int, rank: int, accumulate: int
) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches, in training order, each padded to its own length."""
    from diffllm.data.datamodule import Collator
    from diffllm.diffusion.keys import global_row_index

    collate = Collator(pad_id)
    micro = GLOBAL_BATCH // (world * accumulate)
    out = []
    for rows in batches:
        for m in range(accumulate):
            out.append(collate([rows[g] for g in global_row_index(micro, micro, m, rank, world)]))
    return out


def probe_class():
    """The module, recording what the optimizer receives (after the global normalisation)."""
    from diffllm.training.module import DiffusionLitModule

    class Probe(DiffusionLitModule):
        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            super().on_before_optimizer_step(optimizer)
            self.__dict__.setdefault("grads", []).append(
                {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.requires_grad}
            )

        def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if name == "train/loss":
                self.__dict__.setdefault("losses", []).append(float(value))
            super().log(name, value, *args, **kwargs)

    return Probe


def run(
    world: int, accumulate: int, overrides: list[str] | None = None, accelerator: str = "cpu"
) -> dict[str, Any]:
    """Fit STEPS optimizer steps on this rank's share; returns grads, losses, final trainable weights."""
    import lightning as L
    from torch.utils.data import DataLoader

    module = build_module(overrides, probe_class())
    batches = global_batches(module.tokenizer)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    micro = rank_micro_batches(batches, module.tokenizer.pad_token_id, world, rank, accumulate)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        max_steps=STEPS,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the ranks' shares are cut above, from the global batch
    )
    trainer.fit(module, train_dataloaders=DataLoader(micro, batch_size=None))
    return {
        "grads": [{n: g.cpu() for n, g in step.items()} for step in module.grads],
        "losses": module.losses,
        "weights": {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad},
        "world_size": trainer.world_size,
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    result = run(args.world, args.accumulate, args.overrides)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        torch.save(result, args.out)
