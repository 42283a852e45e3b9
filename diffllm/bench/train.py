"""Training-throughput benchmark: the real training step, timed, with the padding and kernels it uses.

    python -m diffllm.bench.train                      # a GPU if there is one, else the CPU table
    python -m diffllm.bench.train --device cuda [--steps 10] [--time-limit 300] [--out table.md]
    python -m diffllm.bench.train --device cpu  [--steps 30]

On a GPU: Llama-3.2-1B's architecture (``conf/model/llama3_2_1b.yaml``) with random weights
(throughput does not depend on their values) is saved to a temporary folder with a 128,256-token
word-level tokenizer, then converted by the real code path (``DiffusionLitModule`` with the
``alpaca_lora`` experiment with the prefix-LM recipe (``PREFIX_LM``: the step these variants and the
figures in docs/performance.md measure): [MASK] row, prefix-LM, LoRA r=8 on q/k/v/o, bf16 base,
bf16-mixed Lightning trainer, micro-batch 16 x 4 accumulation). ``--recipe experiment`` times the
experiment's own default instead (issue 18's conversion recipe: block diffusion in blocks of 4, the
clean copy token-causal with its next-token loss, complementary masks sharing one clean row; the
curriculum left out so that the final block size is the one timed), with the variants that do not
rewrite its mask (``RECIPE_VARIANTS``). Its tokens/s count the rows' tokens (what the model learns
from), not the two-copy layout's columns. Rows are drawn from Alpaca's length
histogram (``alpaca_lengths.json``, see ``diffllm.bench.lengths``): prompt and answer lengths as a
tokenizer gives them, answers + EOS padded to a multiple of 64 as ``data=alpaca`` does, random
token ids. Every variant runs the same rows through ``lightning.Trainer.fit`` on the same module:

    today            rows in random order, padded to the batch maximum, prefix-LM 4D mask (SDPA)
    grouped          rows grouped by length (transformers' LengthGroupedSampler), prefix-LM (SDPA)
    padding mask     grouped, model.attention=bidirectional: only the (B, L) padding mask
    no mask          grouped, no mask at all (padding attended: NOT a training mode; the kernel ceiling)
    flex             grouped, prefix-LM as a flex-attention BlockMask
    bf16 adapters    grouped, LoRA weights bf16 instead of PEFT's fp32 cast (autocast_adapter_dtype)
    64 x 1           grouped, one micro-batch of 64 rows (16k tokens): the memory figure
    compiled         grouped, ``torch.compile`` of the decoder (dynamic shapes)

Columns: non-pad tokens/s (what the model learns from), all tokens/s, padding share, MFU and the
peak memory of the step. MFU = non-pad tokens/s x FLOPs per token / the card's dense bf16 peak;
FLOPs per token are the training callback's (``diffllm.training.callbacks.flops_per_token``: 4N + 2
N_trainable, N the parameters outside the embeddings and head; about 4N for a frozen base + LoRA);
the lm_head, computed only at the hidden positions, and the attention scores are left out, so MFU
is a floor.
``probe loss`` is the diffusion loss of one fixed batch under a fixed generator in each variant:
variants that compute the same function (today / grouped / flex / compiled) must agree.

On a CPU: the embedded tiny model on its own training split, and the ratio of Lightning's loop to
a bare PyTorch loop (same module, same batches, same optimizer) in tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

# dense bf16 peak of the card (vendor datasheets, SXM parts, no sparsity), by substring of its name
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


@dataclass(frozen=True)
class Variant:
    name: str
    grouped: bool = True
    mask: str = "prefix_lm"  # prefix_lm | padding | none | flex
    fp32_adapters: bool = True
    compiled: bool = False
    micro_batch: int | None = None  # None: the config's data.batch_size
    accumulate: int | None = None  # None: the config's trainer.accumulate_grad_batches


GPU_VARIANTS = (
    Variant("today", grouped=False),
    Variant("grouped"),
    Variant("padding mask", mask="padding"),
    Variant("no mask", mask="none"),
    Variant("flex", mask="flex"),
    Variant("bf16 adapters", fp32_adapters=False),
    Variant("64 x 1", micro_batch=64, accumulate=1),
    Variant("compiled", compiled=True),
)
CPU_VARIANTS = (Variant("today", grouped=False), Variant("grouped"), Variant("padding mask", mask="padding"))
# --recipe experiment: the block model's mask is its own, so the mask variants do not apply
RECIPE_VARIANTS = tuple(v for v in GPU_VARIANTS if v.mask == "prefix_lm")


@dataclass
class Result:
    variant: Variant
    micro_batch: int
    accumulate: int
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0  # all positions of the timed batches (padding included)
    real_tokens: int = 0  # non-pad positions
    peak_bytes: int | None = None
    probe_loss: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def real_per_s(self) -> float:
        return self.real_tokens / self.seconds if self.seconds else float("nan")

    @property
    def all_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    @property
    def pad_share(self) -> float:
        return 1 - self.real_tokens / self.tokens if self.tokens else float("nan")


# -- rows and batches ------------------------------------------------------------------------------
def alpaca_shaped_rows(
    n: int, vocab: int, eos_id: int, answer_pad_to: int, max_length: int, seed: int = 0
) -> list[dict[str, list[int]]]:
    """``n`` encoded rows with Alpaca's (prompt, answer) lengths and random ids, as ``encode_row`` lays them out."""
    from diffllm.bench.histogram import sample_lengths

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for p_len, a_len in sample_lengths(n, seed=seed):
        n_scored = a_len + 1  # the answer and its EOS
        span = n_scored + (-n_scored % answer_pad_to)
        span = max(min(span, max_length - p_len), 1)
        ids = torch.randint(0, vocab, (p_len + span,), generator=gen)
        ids[p_len + min(a_len, span - 1) :] = eos_id
        rows.append(
            {
                "input_ids": ids.tolist(),
                "answer_mask": [0] * p_len + [1] * span,
                "score_mask": [0] * p_len + [1] * min(n_scored, span) + [0] * max(span - n_scored, 0),
            }
        )
    return rows


def batch_order(lengths: Sequence[int], batch_size: int, grouped: bool, seed: int) -> list[int]:
    """Row order of one epoch: a seeded permutation, or length-grouped mega-batches (transformers)."""
    gen = torch.Generator().manual_seed(seed)
    if grouped:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        return list(LengthGroupedSampler(batch_size, lengths=list(lengths), generator=gen))
    return torch.randperm(len(lengths), generator=gen).tolist()


def make_batches(
    rows: Sequence[dict], batch_size: int, grouped: bool, pad_id: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    from diffllm.data.collate import Collator

    order = batch_order([len(r["input_ids"]) for r in rows], batch_size, grouped, seed)
    collate = Collator(pad_id)
    return [
        collate([rows[i] for i in order[s : s + batch_size]])
        for s in range(0, len(order) - batch_size + 1, batch_size)
    ]


def without_padding_mask(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The 'no mask' variant: every position attends to every position (the kernel's ceiling)."""
    return [{**b, "attention_mask": torch.ones_like(b["attention_mask"])} for b in batches]


# -- the model under each variant -------------------------------------------------------------------
def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n]


@contextlib.contextmanager
def variant_applied(module, variant: Variant) -> Iterator[None]:
    """Switch the module to ``variant`` for the block; everything is put back afterwards."""
    dlm = module.dlm
    base = dlm.base
    impl_before, attention_before = base.config._attn_implementation, dlm.attention
    decoder = base.get_decoder()
    lora = lora_parameters(module)
    dtypes = [p.dtype for p in lora]
    try:
        if variant.mask == "padding" or variant.mask == "none":
            dlm.attention = "bidirectional"
        if variant.mask == "flex":
            base.set_attn_implementation("flex_attention")
        if not variant.fp32_adapters:
            for p in lora:
                p.data = p.data.to(torch.bfloat16)
        if variant.compiled:
            decoder.compile(dynamic=True)
        yield
    finally:
        dlm.attention = attention_before
        if base.config._attn_implementation != impl_before:
            base.set_attn_implementation(impl_before)
        for p, dt in zip(lora, dtypes):
            p.data = p.data.to(dt)
        decoder._compiled_call_impl = None  # undo nn.Module.compile


class StepTimer(Callback):
    """Times the micro-batches after ``warmup`` optimizer steps and counts their tokens."""

    def __init__(self, warmup_micro: int, sync: Callable[[], None]) -> None:
        self.warmup_micro, self.sync = warmup_micro, sync
        self.t0: float | None = None
        self.t1 = 0.0
        self.tokens = self.real = self.micro = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.warmup_micro:
            self.sync()
            self.t0 = time.perf_counter()
        elif batch_idx + 1 > self.warmup_micro:
            self.micro += 1
            self.tokens += batch["attention_mask"].numel()
            self.real += int(batch["attention_mask"].sum())
            self.sync()
            self.t1 = time.perf_counter()


def probe_loss(module, batch: dict[str, torch.Tensor], device: torch.device, precision: str) -> float:
    """The diffusion loss of one batch under a fixed generator (the same draws in every variant)."""
    module.to(device).eval()
    batch = {k: v.to(device) for k, v in batch.items()}
    gen = torch.Generator(device=device).manual_seed(1234)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if "bf16" in precision else contextlib.nullcontext()
    )
    with torch.no_grad(), autocast:
        loss, _ = module.diffusion_loss(batch, generator=gen)
    module.train()
    return float(loss)


def run_variant(
    module,
    rows: Sequence[dict],
    variant: Variant,
    *,
    micro_batch: int,
    accumulate: int,
    warmup: int,
    steps: int,
    device: torch.device,
    precision: str,
    pad_id: int,
    probe: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> Result:
    """Fit ``warmup + steps`` optimizer steps of ``variant`` with Lightning and time the last ``steps``."""
    res = Result(variant, micro_batch, accumulate)
    n_micro = (warmup + steps) * accumulate
    batches = make_batches(rows, micro_batch, variant.grouped, pad_id, seed)
    if len(batches) < n_micro:
        raise ValueError(f"{len(rows)} rows give {len(batches)} micro-batches; {n_micro} are needed")
    batches = batches[:n_micro]
    probe = batches[0] if probe is None else probe
    if variant.mask == "none":
        batches, (probe,) = without_padding_mask(batches), without_padding_mask([probe])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timer = StepTimer(warmup * accumulate, sync)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    with variant_applied(module, variant):
        res.probe_loss = probe_loss(module, probe, device, precision)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
        if cuda:
            res.peak_bytes = torch.cuda.max_memory_allocated(device)
    res.steps = timer.micro // accumulate
    res.seconds = timer.t1 - (timer.t0 or timer.t1)
    res.tokens, res.real_tokens = timer.tokens, timer.real
    return res


def bare_loop_tokens_per_s(module, batches: Sequence[dict], warmup: int, lr: float) -> float:
    """The same step without Lightning: keyed draws, forward, backward, clip, AdamW (non-pad tokens/s after warmup)."""
    from diffllm.training.distributed import draw_keys

    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    module.train()
    t0, real = None, 0
    for i, batch in enumerate(batches):
        bs = batch["input_ids"].shape[0]
        # seed 0, step i, micro-batch 0 of 1, one rank: the keys Lightning's training_step draws
        keys = draw_keys(0, i, 0, bs, bs, 1, 0, 1)
        loss, _ = module.diffusion_loss(batch, keys=keys)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i + 1 == warmup:
            t0 = time.perf_counter()
        elif i + 1 > warmup:
            real += int(batch["attention_mask"].sum())
    return real / (time.perf_counter() - t0)


# -- the models -------------------------------------------------------------------------------------
def word_level_tokenizer(vocab_size: int, bos_id: int, eos_id: int):
    """A tokenizer with ``vocab_size`` entries and the model's BOS/EOS ids (Llama 3's is gated)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab["<bos>"], vocab["<eos>"] = bos_id, eos_id
    del vocab[f"t{bos_id}"], vocab[f"t{eos_id}"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="t0")


def random_llama_folder(architecture: dict[str, Any], folder: Path, device: torch.device) -> None:
    """Save Llama-3.2-1B's architecture with random bf16 weights and a matching tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(architecture)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    word_level_tokenizer(config.vocab_size, config.bos_token_id, config.eos_token_id).save_pretrained(folder)
    del model


# the mission's first recipe on top of +experiment=alpaca_lora (which now trains block diffusion):
# the step every variant below rewrites and every published figure of this benchmark measured
PREFIX_LM = [
    "+recipe=prefix_lm",  # conf/recipe/prefix_lm.yaml
    "sampler.block_length=32",
    "sampler.cache=none",
]


# --recipe: prefix_lm, the published step (the bare default on the tiny model); experiment, the
# experiment's own recipe at its final block size (no curriculum)
RECIPES = ("prefix_lm", "experiment")
EXPERIMENTS = {"llama": "+experiment=alpaca_lora", "tiny": "+experiment=tiny_recipe"}


def recipe_overrides(recipe: str, model: str) -> list[str]:
    """The overrides a benchmark run of ``model`` (llama | tiny) composes for ``recipe``."""
    if recipe == "prefix_lm":
        return [EXPERIMENTS["llama"], *PREFIX_LM] if model == "llama" else []
    if recipe == "experiment":
        return [EXPERIMENTS[model], "model.block_schedule=null"]
    raise ValueError(f"--recipe {recipe!r}: choose from {list(RECIPES)}")


def compose_run(overrides: list[str]) -> dict[str, Any]:
    from diffllm.config.resolvers import compose, to_plain

    return to_plain(compose(overrides + ["output_dir=" + tempfile.gettempdir()]))


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# -- the table ---------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def build_table(results: Sequence[Result], flops_per_token: float, peak: float | None) -> str:
    """Markdown table of the measured variants (pure: tested on hand-made results)."""
    head = (
        "| variant | micro-batch x accum | steps timed | padding | non-pad tokens/s | all tokens/s "
        "| MFU | peak GB | probe loss |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    base = next((r for r in results if r.error is None and r.variant.name == "today"), None)
    for r in results:
        name = r.variant.name
        if r.error:
            lines.append(f"| {name} | {r.micro_batch} x {r.accumulate} | failed: {r.error[:120]} |||||||")
            continue
        mfu = r.real_per_s * flops_per_token / peak if peak else None
        ratio = f" ({r.real_per_s / base.real_per_s:.2f}x)" if base and r is not base else ""
        lines.append(
            f"| {name} | {r.micro_batch} x {r.accumulate} | {r.steps} | {100 * r.pad_share:.1f} % "
            f"| {r.real_per_s:,.0f}{ratio} | {r.all_per_s:,.0f} | {_fmt(None if mfu is None else 100 * mfu, '.1f')}"
            f"{'' if mfu is None else ' %'} | {_fmt(None if r.peak_bytes is None else r.peak_bytes / 2**30, '.1f')} "
            f"| {_fmt(r.probe_loss, '.4f')} |"
        )
    return "\n".join(lines)


def measure(
    module,
    rows: Sequence[dict],
    variants: Sequence[Variant],
    *,
    micro_batch: int,
    accumulate: int,
    warmup: int,
    steps: int,
    device: torch.device,
    precision: str,
    pad_id: int,
    time_limit: float,
    log: Callable[[str], None],
) -> list[Result]:
    results, start = [], time.perf_counter()
    # every variant starts from the same trainable weights and is probed on the same batch
    initial = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    probe = make_batches(rows[:micro_batch], micro_batch, False, pad_id)[0]
    for v in variants:
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in initial:
                    p.copy_(initial[n].to(p.device, p.dtype))
        mb, acc = v.micro_batch or micro_batch, v.accumulate or accumulate
        if time.perf_counter() - start > time_limit:
            results.append(Result(v, mb, acc, error=f"skipped: --time-limit {time_limit:.0f} s reached"))
            continue
        t = time.perf_counter()
        try:
            r = run_variant(
                module, rows, v, micro_batch=mb, accumulate=acc, warmup=warmup, steps=steps,
                device=device, precision=precision, pad_id=pad_id, probe=probe,
            )  # fmt: skip
        except Exception as err:  # one failing kernel must not lose the other rows
            r = Result(v, mb, acc, error=f"{type(err).__name__}: {err}".replace("\n", " "))
        log(f"  {v.name}: {time.perf_counter() - t:.1f} s" + (f" ({r.error})" if r.error else ""))
        log(f"  measured: {r}")  # each row as it comes, in case a time limit kills the run
        results.append(r)
    return results


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument(
        "--steps", type=int, default=None, help="timed optimizer steps per variant (GPU 10, CPU 30)"
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps first (GPU 3, CPU 5)")
    p.add_argument("--variants", nargs="*", default=None, help="names of the variants to run (default: all)")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds; later variants are skipped")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument(
        "--model", choices=["llama", "tiny"], default=None, help="default: llama on a GPU, tiny on CPU"
    )
    p.add_argument(
        "--arch", nargs="*", default=[], help="llama architecture overrides key=int (a small CPU check)"
    )
    p.add_argument(
        "--micro-batch", type=int, default=None, help="rows per micro-batch (default: the config's)"
    )
    p.add_argument(
        "--accumulate", type=int, default=None, help="micro-batches per step (default: the config's)"
    )
    p.add_argument(
        "--recipe",
        choices=RECIPES,
        default="prefix_lm",
        help="prefix_lm: the published step; experiment: the experiment's conversion recipe (block 4, "
        "causal clean stream, complementary pair)",
    )
    args = p.parse_args(argv)
    device_name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device_name = "cpu" if device_name == "auto" else device_name
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here; use --device cpu for the tiny-model table")
    device = torch.device(device_name)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    L.seed_everything(0, verbose=False)
    cuda = device.type == "cuda"
    llama = (args.model or ("llama" if cuda else "tiny")) == "llama"
    model_name = "llama" if llama else "tiny"
    if args.recipe == "experiment":
        variants = RECIPE_VARIANTS if llama else tuple(v for v in CPU_VARIANTS if v.mask == "prefix_lm")
    else:
        variants = GPU_VARIANTS if llama else CPU_VARIANTS
    if args.variants:
        unknown = set(args.variants) - {v.name for v in variants}
        if unknown:
            sys.exit(f"--variants {sorted(unknown)}: choose from {[v.name for v in variants]}")
        variants = tuple(v for v in variants if v.name in args.variants)
    steps = args.steps or (10 if cuda else 30)
    warmup = args.warmup or (3 if cuda else 5)

    from diffllm.training.module import DiffusionLitModule

    with tempfile.TemporaryDirectory() as tmp:
        if llama:
            cfg = compose_run(
                recipe_overrides(args.recipe, model_name)
                + ([] if cuda else ["trainer=cpu", "trainer.precision=bf16-mixed"])
            )
            arch = {**cfg["model"]["config"], **{k: int(v) for k, v in (a.split("=", 1) for a in args.arch)}}
            log("saving Llama-3.2-1B's architecture with random weights ...")
            random_llama_folder(arch, Path(tmp), device)
            cfg["model"].update(pretrained=tmp, config=None)
            cfg["data"]["batch_size"] = args.micro_batch or cfg["data"]["batch_size"]
            cfg["trainer"]["accumulate_grad_batches"] = (
                args.accumulate or cfg["trainer"]["accumulate_grad_batches"]
            )
            module = DiffusionLitModule.from_run_config(cfg)
            tok = module.tokenizer
            data = cfg["data"]
            n_rows = max(v.micro_batch or data["batch_size"] for v in variants)
            n_rows *= (warmup + steps) * max(
                v.accumulate or cfg["trainer"]["accumulate_grad_batches"] for v in variants
            )
            rows = alpaca_shaped_rows(
                n_rows, vocab=128_000, eos_id=module.eos_id, answer_pad_to=data["answer_pad_to"],
                max_length=data["max_length"],
            )  # fmt: skip
            what = "Llama-3.2-1B shape" + (f" ({' '.join(args.arch)})" if args.arch else "")
            what += ", random weights, Alpaca length histogram"
        else:
            cfg = compose_run(recipe_overrides(args.recipe, model_name))
            module = DiffusionLitModule.from_run_config(cfg)
            tok = module.tokenizer
            from hydra.utils import instantiate

            dm = instantiate(cfg["data"], tokenizer=tok, report_dir=None)
            dm.setup()
            rows = [dm.train_ds[i] for i in range(len(dm.train_ds))]
            data = cfg["data"]
            what = "embedded tiny model, its own training split"
        micro_batch, accumulate = data["batch_size"], cfg["trainer"]["accumulate_grad_batches"]
        precision = cfg["trainer"]["precision"]
        what += f"; recipe {args.recipe}" + (
            f" ({module.dlm.attention}, block {module.dlm.block_size})" if args.recipe == "experiment" else ""
        )
        log(f"{what}; {len(rows)} rows; device {device}")
        t_all = time.perf_counter()
        results = measure(
            module, rows, variants, micro_batch=micro_batch, accumulate=accumulate, warmup=warmup,
            steps=steps, device=device, precision=precision, pad_id=tok.pad_token_id,
            time_limit=args.time_limit, log=log,
        )  # fmt: skip
        from diffllm.training.callbacks import flops_per_token

        flops = flops_per_token(module.dlm.model)
        lines = [
            f"## Training throughput: {what}",
            "",
            f"device: {torch.cuda.get_device_name(device) if cuda else f'CPU, {torch.get_num_threads()} thread(s)'}; "
            f"torch {torch.__version__}; precision {precision}; {warmup} warm-up + {steps} timed optimizer steps "
            f"per variant; FLOPs/token = {flops:,} (4N + 2 N_trainable, diffllm.training.callbacks.flops_per_token)",
            "",
            build_table(results, flops, peak_flops(device)),
        ]
        if not llama:
            module.to(device)
            batches = make_batches(rows, micro_batch, False, tok.pad_token_id)[: warmup + steps]
            torch.manual_seed(0)
            bare = bare_loop_tokens_per_s(module, batches, warmup, lr=cfg["optimizer"]["lr"])
            lit = next((r for r in results if r.variant.name == "today" and r.error is None), None)
            if lit is not None:
                lines += [
                    "",
                    f"Lightning vs bare PyTorch loop (same module, same batches in the same order, AdamW, clip 1.0): "
                    f"{lit.real_per_s:,.0f} vs {bare:,.0f} non-pad tokens/s = **{lit.real_per_s / bare:.3f}x**",
                ]
        lines += ["", f"({time.perf_counter() - t_all:.0f} s; command: python -m diffllm.bench.train "
                  + " ".join(sys.argv[1:] if argv is None else argv) + ")"]  # fmt: skip
    table = "\n".join(lines)
    print(table, flush=True)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return table


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
