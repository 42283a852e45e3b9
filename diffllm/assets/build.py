"""Build the embedded tiny world: task data -> BPE tokenizer -> a tiny LLaMA trained autoregressively.

The default diffusion run converts this tiny AR model exactly as it converts Llama 3.2: same
architecture class (``LlamaForCausalLM``, tied embeddings, grouped-query attention), a tokenizer
with BOS/EOS/PAD and no mask token (the conversion adds "[MASK]" as a new embedding row).

The AR base is trained with next-token cross-entropy on the answer tokens + EOS of
``<s> prompt answer </s>`` (``prompt_weight=0``), averaged over the answer tokens of the batch, like
an SFT'd model. Why not the whole sequence: the prompts are mostly irreducible noise (random words
and digits, ~3.7 nats per list word) that the answers are a function of, and the budget is ~3 CPU
minutes. Measured on 180 val rows at 2000 steps (on earlier variants of the add/lookup tasks):
at lr 1e-3 prompt weight 0.25 gave exact match 0.52 and prompt weight 0 gave 0.61; lr 3e-3 stalls
(0.26-0.28) and 6e-4 was best of {3e-3, 1e-3, 6e-4} (0.84 vs 0.81 at 1e-3); normalising per row
instead of per token (short lookup/add answers weigh more) kept the copy/reverse/sort circuits from
forming (0.38). The conversion only ever reads hidden states at answer
positions and the last prompt position (with shift), which is exactly what this loss trains.

The same code path builds the second embedded world, ``tiny_long`` (``TINY_LONG``: the long-answer
task set of ``diffllm.data.tiny_long_tasks``, the tiny tokenizer reused, 256 positions): a
``TaskSet`` holds what differs between the two, a ``BuildConfig`` the training knobs.

Everything is seeded; with the same torch build and thread count the weights are reproducible.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from diffllm.data import tiny_long_tasks, tiny_tasks
from diffllm.data.collate import Collator
from diffllm.data.datamodule import encode_row as encode_for_training
from diffllm.data.template import get_format, render
from diffllm.evaluation.compare import answer_tokens, eval_batches
from diffllm.evaluation.compare import exact_match_by_task as exact_match_per_task
from diffllm.evaluation.metrics import exact_match, unigram_cross_entropy
from diffllm.evaluation.scoring import ar_answers, score_rows
from diffllm.model.dlm import DiffusionLM

TEMPLATE = "short"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
MAX_LENGTH = 128  # the tokenizer's model_max_length; every tiny row is far shorter (<= 48 tokens)
ASSETS_DIR = Path(__file__).resolve().parent  # diffllm/assets: one folder per embedded world


@dataclass(frozen=True)
class TaskSet:
    """What differs between the embedded worlds: the rows, where the tokenizer comes from, lengths."""

    name: str  # the asset folder's name (``diffllm/assets/<name>``)
    tasks: tuple[str, ...]
    generate_rows: Callable[[int, int, str | None], list[dict]]
    read_jsonl: Callable[[Path], list[dict]]
    write_jsonl: Callable[[Iterable[Mapping], Path], Path]
    generator_module: str  # where the rows come from (for the README)
    max_length: int = MAX_LENGTH  # the tokenizer's model_max_length and the encoding cap
    max_new_tokens: int = 12  # greedy evaluation budget (the longest answer + EOS, and some)
    tokenizer_from: str | None = None  # reuse the tokenizer of this asset folder's ar_base/ (None: train one)
    generate_short_rows: Callable[[int, int], list[dict]] | None = None  # BuildConfig.short_rows draws these
    command: str = "python -m diffllm.assets --force"
    build_time: str = "about 3-4 minutes on 2 idle CPU cores"
    idle_speed: str = "about 0.09 s/step when the two cores are not shared with other jobs"  # README
    title: str = "Tiny embedded world"


TINY = TaskSet(
    "tiny",
    tiny_tasks.TASKS,
    tiny_tasks.generate_rows,
    tiny_tasks.read_jsonl,
    tiny_tasks.write_jsonl,
    "diffllm/data/tiny_tasks.py",
)
TINY_LONG = TaskSet(
    "tiny_long",
    tiny_long_tasks.TASKS,
    tiny_long_tasks.generate_rows,
    tiny_long_tasks.read_jsonl,
    tiny_long_tasks.write_jsonl,
    "diffllm/data/tiny_long_tasks.py",
    max_length=256,  # the longest row is 146 tokens; a 128-token answer budget after an 82-token prompt fits
    max_new_tokens=72,  # answers of at most 63 tokens + EOS
    tokenizer_from="tiny",  # the same words and digits: the tiny tokenizer covers them
    generate_short_rows=tiny_long_tasks.generate_short_rows,
    command="python -m diffllm.assets tiny_long --force",
    build_time="see train_seconds below: one thread under `nice` on a shared machine",
    idle_speed="not timed on idle cores",
    title="Tiny embedded world, long answers (the tokenizer and words of `tiny/`)",
)
TASK_SETS = {ts.name: ts for ts in (TINY, TINY_LONG)}


@dataclass
class BuildConfig:
    """Every knob of the tiny build; saved next to the assets as ``build_info.json``."""

    n_train: int = 8000
    n_val: int = 500
    train_seed: int = 0
    val_seed: int = 1
    vocab_size: int = 512  # upper bound; BPE stops when no pair occurs twice (~496 here)
    model: dict = field(
        default_factory=lambda: dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=344,
            max_position_embeddings=128,
            tie_word_embeddings=True,  # as in Llama-3.2-1B
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
        )
    )
    model_seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 6e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    prompt_weight: float = 0.0  # loss weight of prompt tokens; answer tokens (+EOS) weigh 1
    row_mean: bool = False  # normalise the loss per row instead of per answer token (worse, see above)
    init_from: str | None = None  # start from this asset folder's ar_base/ weights (None: random init)
    short_rows: int = 0  # extra base-only training rows from the task set's generate_short_rows
    short_seed: int = 2
    threads: int = 2
    eval_rows: int | None = None  # None: all val rows


# The long-answer base: the tiny architecture with 256 positions, on rows 3.4x longer than the tiny
# set's (mean 95 tokens against 28), so a step costs about 3.4x more: 2000 steps at lr 1e-3 on one
# thread (build_info.json has the wall time). It starts from the tiny base's weights, which is what
# makes the long lists copyable: from random weights the copy loss stayed on its plateau (exact match
# 0 on copy and reverse), from the tiny weights it reached zero by step 1000. The 3000 copy / reverse
# rows of 3-16-word lists beside the 6000 long rows turned out unnecessary; they are kept so that the
# build reproduces the committed weights (docs/speculative.md, "A long-world base that copies").
BUILD_CONFIGS = {
    "tiny": BuildConfig(),
    "tiny_long": BuildConfig(
        n_train=6000,
        model={**BuildConfig().model, "max_position_embeddings": 256},
        steps=2000,
        lr=1e-3,
        threads=1,
        init_from="tiny",
        short_rows=3000,
    ),
}


# ---------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts``; digits are split one per token.

    Byte-level (as in Llama 3) so any text round-trips exactly; the 256 byte symbols are all in
    the vocabulary. Encoding adds BOS (``<s>``) in front, like Llama 3; EOS is appended by the
    caller after the answer.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=128
    )


def encode_row(tokenizer, row: dict, max_length: int = MAX_LENGTH) -> dict:
    """``<s> prompt answer </s>`` as the training pipeline encodes it (``data.datamodule.encode_row``,
    no EOS padding): ``input_ids``, ``answer_mask`` = ``score_mask`` (answer tokens and EOS)."""
    return encode_for_training(row, tokenizer, TEMPLATE, max_length)


# ---------------------------------------------------------------------------------------- training


def train_ar(model: LlamaForCausalLM, encoded: list[dict], cfg: BuildConfig, pad_id: int) -> list[float]:
    """Next-token CE on ``<s> prompt answer </s>``, prompt tokens weighted ``cfg.prompt_weight``.

    Right padding needs no attention mask under causal attention (a real token never attends to a
    later pad); pad targets get weight 0. Returns the per-step losses.
    """
    gen = torch.Generator().manual_seed(cfg.train_seed)
    collate = Collator(pad_id)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )

    # TODO(lead): replace with the project's LR schedule function (helper "config", issue 12 item 3)
    # once it lands: the same formula as DiffusionLitModule's, with min_lr_ratio=0.1 and
    # total=cfg.steps. transformers' get_cosine_with_min_lr_schedule_with_warmup warms up from
    # step/warmup instead of (step+1)/warmup, so it would not rebuild the committed weights.
    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10 %
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses, order, cursor = [], torch.randperm(len(encoded), generator=gen), 0
    start = time.perf_counter()
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(encoded), generator=gen), 0
        idx = order[cursor : cursor + cfg.batch_size].tolist()
        cursor += cfg.batch_size
        batch = collate([encoded[i] for i in idx])
        ids, answer = batch["input_ids"], batch["answer_mask"]  # (B, L) right-padded, False on padding
        logits = model(input_ids=ids).logits[:, :-1]  # (B, L-1, V): position i predicts i+1
        targets, target_answer = ids[:, 1:], answer[:, 1:]
        weight = torch.where(target_answer, 1.0, cfg.prompt_weight) * (targets != pad_id)
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, L-1)
        if cfg.row_mean:  # every row weighs the same, whatever its answer length
            weight = weight / weight.sum(dim=1, keepdim=True)
        loss = (ce * weight).sum() / weight.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 250 == 0 or step == 0:
            print(
                f"  step {step + 1:5d}/{cfg.steps}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}"
                f"  lr {sched.get_last_lr()[0]:.2e}  {time.perf_counter() - start:6.1f}s",
                flush=True,
            )
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------- evaluation


def greedy_answers(model, tokenizer, rows: Sequence[dict], max_new_tokens: int = 12) -> list[str]:
    """Greedy causal answers (``scoring.ar_answers``: the project's AR decoding, KV cache)."""
    fmt = get_format(TEMPLATE)
    prompt_ids = [fmt.prompt_ids(r, tokenizer) for r in rows]
    return ar_answers(
        model, tokenizer, prompt_ids, max_new_tokens, eos_id=tokenizer.eos_token_id, batch_size=64
    ).texts


def exact_match_by_task(rows: Sequence[dict], answers: Sequence[str]) -> dict[str, float]:
    """Exact match (``metrics.exact_match``, whitespace-normalised) per task, plus 'all', rounded."""
    refs = [r["output"] for r in rows]
    per_task = exact_match_per_task([r["task"] for r in rows], refs, model=answers)
    out = {t["task"]: round(t["model_exact_match"], 4) for t in per_task}
    return dict(sorted({**out, "all": round(exact_match(answers, refs), 4)}.items()))


def answer_nll(
    model, tokenizer, rows: Sequence[dict], batch_size: int = 64, max_length: int = MAX_LENGTH
) -> dict[str, float]:
    """Teacher-forced AR NLL of answer tokens + EOS (``scoring``'s ``ar_base`` row), nats per token,
    per task and 'all'."""
    encoded = [encode_row(tokenizer, r, max_length) for r in rows]
    # the tiny base has no [MASK] row; the AR scoring path never reads mask_id
    base = DiffusionLM(model, mask_id=len(tokenizer))
    scores = score_rows(
        eval_batches(encoded, Collator(tokenizer.pad_token_id), batch_size),
        seed=0,
        device="cpu",
        num_samples=1,
        method="grid",
        end_id=tokenizer.eos_token_id,
        ar_base=base,
    )
    tasks = np.array([str(r["task"]) for r in rows])
    out = {"all": float(scores["ar_base"].sum() / scores["tokens"].sum())}
    for task in set(tasks):
        sel = tasks == task
        out[str(task)] = float(scores["ar_base"][sel].sum() / scores["tokens"][sel].sum())
    return {k: round(v, 4) for k, v in sorted(out.items())}


def answer_unigram_ce(
    tokenizer, train_rows: Sequence[dict], val_rows: Sequence[dict], max_length: int = MAX_LENGTH
) -> float:
    """CE (nats/token) of val answer tokens + EOS under the add-one unigram of train answers
    (``metrics.unigram_cross_entropy``)."""
    train = answer_tokens(encode_row(tokenizer, r, max_length) for r in train_rows)
    val = answer_tokens(encode_row(tokenizer, r, max_length) for r in val_rows)
    return round(unigram_cross_entropy(train, val, vocab_size=len(tokenizer)), 4)


# ---------------------------------------------------------------------------------------- build


def build(out: str | Path, cfg: BuildConfig | None = None, task_set: TaskSet = TINY) -> dict:
    """Write train.jsonl, val.jsonl, ar_base/ (model + tokenizer), build_info.json and README.md.

    ``task_set`` picks the world (``TINY``, ``TINY_LONG``); ``cfg`` defaults to its ``BUILD_CONFIGS`` entry.
    """
    cfg = cfg or BUILD_CONFIGS[task_set.name]
    ts = task_set
    final = Path(out)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="diffllm-tiny-"))  # outside the repo: no litter if killed
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()

    print(
        f"[1/4] data: {cfg.n_train} train rows (seed {cfg.train_seed}), {cfg.n_val} val rows (seed {cfg.val_seed})"
    )
    ts.write_jsonl(ts.generate_rows(cfg.n_train, cfg.train_seed, "train"), staging / "train.jsonl")
    ts.write_jsonl(ts.generate_rows(cfg.n_val, cfg.val_seed, "val"), staging / "val.jsonl")
    train_rows, val_rows = ts.read_jsonl(staging / "train.jsonl"), ts.read_jsonl(staging / "val.jsonl")

    if ts.tokenizer_from is None:
        print(f"[2/4] tokenizer: byte-level BPE, vocab <= {cfg.vocab_size}, trained on rendered train rows")
        tokenizer = train_tokenizer(["".join(render(r, TEMPLATE)) for r in train_rows], cfg.vocab_size)
    else:
        source = ASSETS_DIR / ts.tokenizer_from / "ar_base"
        print(f"[2/4] tokenizer: reused from {source} (model_max_length {ts.max_length})")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(source, model_max_length=ts.max_length)
    encoded = [encode_row(tokenizer, r, ts.max_length) for r in train_rows]
    lengths = [len(r["input_ids"]) for r in encoded]
    print(
        f"      vocab {len(tokenizer)}; sequence length min/mean/max {min(lengths)}/{sum(lengths) / len(lengths):.1f}/{max(lengths)}"
    )

    base_rows = encoded
    if cfg.short_rows:
        if ts.generate_short_rows is None:
            raise ValueError(
                f"BuildConfig.short_rows={cfg.short_rows} but the {ts.name!r} task set has no "
                "generate_short_rows; set short_rows=0"
            )
        short = ts.generate_short_rows(cfg.short_rows, cfg.short_seed)
        base_rows = encoded + [encode_row(tokenizer, r, ts.max_length) for r in short]
        print(
            f"      + {len(short)} short rows for the AR base only (seed {cfg.short_seed}; not in train.jsonl)"
        )

    print(f"[3/4] AR base: LlamaForCausalLM {cfg.model}; {cfg.steps} steps x batch {cfg.batch_size}")
    torch.manual_seed(cfg.model_seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **cfg.model,
    )
    model = LlamaForCausalLM(config) if cfg.init_from is None else warm_start(config, cfg.init_from)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"      {n_params:,} parameters" + (f", from {cfg.init_from}/ar_base" if cfg.init_from else ""))
    t_train = time.perf_counter()
    losses = train_ar(model, base_rows, cfg, tokenizer.pad_token_id)
    train_seconds = time.perf_counter() - t_train
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(staging / "ar_base")
    tokenizer.save_pretrained(staging / "ar_base")

    print("[4/4] evaluation on val rows (causal attention, greedy decoding)")
    eval_rows = val_rows if cfg.eval_rows is None else val_rows[: cfg.eval_rows]
    answers = greedy_answers(model, tokenizer, eval_rows, ts.max_new_tokens)
    metrics = {
        "exact_match": exact_match_by_task(eval_rows, answers),
        "answer_nll": answer_nll(model, tokenizer, eval_rows, max_length=ts.max_length),
        "unigram_ce": answer_unigram_ce(tokenizer, train_rows, eval_rows, ts.max_length),
        "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
    }
    info = {
        "build_config": asdict(cfg),
        "template": TEMPLATE,
        "tasks": list(ts.tasks),
        "vocab_size": len(tokenizer),
        "special_tokens": {
            "pad": tokenizer.pad_token_id,
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
        },
        "sequence_length": {
            "min": min(lengths),
            "mean": round(sum(lengths) / len(lengths), 2),
            "max": max(lengths),
        },
        "parameters": n_params,
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__,
        "eval_rows": len(eval_rows),
        "metrics": metrics,
    }
    (staging / "README.md").write_text(_readme(info, ts))
    (staging / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    _publish(staging, final)
    print(f"      exact match: {metrics['exact_match']}")
    print(f"      answer NLL (nats/token): {metrics['answer_nll']}")
    print(f"      unigram CE of answer tokens: {metrics['unigram_ce']} nats/token")
    print(f"done in {time.perf_counter() - t0:.0f}s (AR training {train_seconds:.0f}s) -> {final}")
    return info


def warm_start(config: LlamaConfig, folder: str) -> LlamaForCausalLM:
    """The weights of ``ASSETS_DIR/folder/ar_base`` in the architecture ``config``.

    Only ``max_position_embeddings`` may differ (RoPE has no position weights, so the same tensors
    serve a longer context); any other difference is an error naming the key.
    """
    source = ASSETS_DIR / folder / "ar_base"
    model = LlamaForCausalLM.from_pretrained(source, max_position_embeddings=config.max_position_embeddings)
    mine, theirs = config.to_dict(), model.config.to_dict()
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "tie_word_embeddings", "rope_theta", "rms_norm_eps", "bos_token_id",
            "eos_token_id", "pad_token_id")  # fmt: skip
    differ = {k: (theirs.get(k), mine.get(k)) for k in keys if theirs.get(k) != mine.get(k)}
    if differ:
        raise ValueError(
            f"BuildConfig.init_from={folder!r}: {source} differs from the build's architecture in "
            f"{differ} (theirs, ours); build with the same model keys or set init_from=None"
        )
    return model


def _publish(staging: Path, final: Path) -> None:
    """Move the built files from ``staging`` into ``final``, ``build_info.json`` last.

    The build happens in a staging folder so that an interrupted build never leaves a folder that
    looks complete (``ensure_tiny_assets`` checks for ``build_info.json`` among others); it may be
    on another file system, hence ``shutil.move``.
    """
    final.mkdir(parents=True, exist_ok=True)
    (final / "build_info.json").unlink(missing_ok=True)
    for name in ("train.jsonl", "val.jsonl", "ar_base", "README.md", "build_info.json"):
        target = final / name
        if target.is_dir():
            shutil.rmtree(target)
        shutil.move(staging / name, target)
    staging.rmdir()


def _warm_start_text(cfg: dict) -> str:
    parts = []
    if cfg.get("init_from"):
        parts.append(f"from the weights of `{cfg['init_from']}/ar_base`")
    if cfg.get("short_rows"):
        parts.append(
            f"on the train rows plus {cfg['short_rows']} rows of the task set's "
            f"`generate_short_rows(seed={cfg['short_seed']})` (base only, not in `train.jsonl`)"
        )
    return ", " + " and ".join(parts) if parts else ""


def _readme(info: dict, ts: TaskSet = TINY) -> str:
    cfg, m = info["build_config"], info["metrics"]
    rows = "\n".join(
        f"| {t} | {m['exact_match'][t]:.3f} | {m['answer_nll'][t]:.3f} |" for t in [*info["tasks"], "all"]
    )
    return f"""# {ts.title} (generated — do not edit by hand)

Rebuild with `{ts.command}` ({ts.build_time}); the numbers
below come from that command (`build_info.json` holds them machine-readably).

- `train.jsonl`: {cfg["n_train"]} rows, `generate_rows({cfg["n_train"]}, seed={cfg["train_seed"]}, split="train")`
- `val.jsonl`: {cfg["n_val"]} rows, `generate_rows({cfg["n_val"]}, seed={cfg["val_seed"]}, split="val")`
  (train and val problems are disjoint by a hash of the prompt; see `{ts.generator_module}`)
- tasks: {", ".join(info["tasks"])}; template `{info["template"]}`; sequences `<s> prompt answer </s>`
  are {info["sequence_length"]["min"]}-{info["sequence_length"]["max"]} tokens (mean {info["sequence_length"]["mean"]})
- `ar_base/`: tokenizer (byte-level BPE, vocab {info["vocab_size"]}, `<pad>`={info["special_tokens"]["pad"]},
  `<s>`={info["special_tokens"]["bos"]}, `</s>`={info["special_tokens"]["eos"]}, no mask token; encoding adds `<s>`)
  and `LlamaForCausalLM` ({info["parameters"]:,} parameters): {json.dumps(cfg["model"])}
- AR training: next-token CE with prompt tokens weighted {cfg["prompt_weight"]} and answer tokens + EOS weighted 1 (mean over the batch's tokens){_warm_start_text(cfg)};
  {cfg["steps"]} steps x batch {cfg["batch_size"]}, AdamW lr {cfg["lr"]} (warmup {cfg["warmup_steps"]}, cosine to 10 %),
  {cfg["threads"]} threads: {info["train_seconds"]} s wall, {info["train_seconds"] / cfg["steps"]:.3f} s/step (torch {info["torch"]};
  {ts.idle_speed}); final train loss {m["final_train_loss"]}

## AR base on {info["eval_rows"]} val rows (causal attention)

Greedy exact match (`scoring.ar_answers`; `metrics.exact_match`, whitespace-normalised) and teacher-forced answer NLL (answer tokens + EOS, nats/token):

| task | exact match | answer NLL |
|---|---|---|
{rows}

Unigram cross-entropy of the answer tokens (train-answer unigram, add-one): **{m["unigram_ce"]} nats/token**.
"""
