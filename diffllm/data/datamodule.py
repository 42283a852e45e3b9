"""Alpaca-format data -> padded batches {input_ids, attention_mask, answer_mask, score_mask}.

A row renders through the prompt format (``data.template``) into prompt ids and an answer; tokens
are ``prompt_ids + answer_ids + [END]`` where END is the format's end-of-answer id (EOS, or the
chat template's end-of-turn token: ``diffllm.data.template.end_of_answer_id``), and
``answer_mask`` is True on ``answer_ids + [END]`` only (optionally also on extra END padding up to
a length bucket, LLaDA-style; ``score_mask`` then stays on ``answer_ids + [END]``: the tokens
likelihoods are reported per). Tokenisation runs
through ``datasets.map`` (batched, cached by fingerprint); batches are padded per batch.

Rows that are not Alpaca rows are never silently dropped: they are counted, logged with their
index and reason, written to ``rejected_rows.jsonl`` in the run folder, and ``strict=True`` turns
them into an error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from diffllm.data.collate import Collator
from diffllm.data.order import ResumableLoader, ResumableSampler
from diffllm.data.template import MalformedRowError, check_row, end_of_answer_id, get_format

log = logging.getLogger(__name__)


def encode_row(
    row: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    max_length: int,
    answer_pad_to: int | None = None,
) -> dict[str, Any]:
    """One row -> ``input_ids``, ``answer_mask``, ``score_mask`` (lists of 0/1), ``prompt_len``, ``truncated``.

    The prompt is the format's (a text format keeps the tokenizer's own special tokens, e.g. BOS;
    ``chat`` is the chat template's own text); the answer has no special tokens and ends with the
    end-of-answer id (``end_of_answer_id(tokenizer, template)``: EOS, or the chat template's end of
    turn). ``answer_pad_to=k`` appends extra end ids so the supervised span is a multiple of k
    tokens (LLaDA SFT: the model learns to fill a fixed canvas with EOS after its answer).
    ``answer_mask`` marks the supervised span (answer, EOS and the padding EOS): what is hidden and
    trained on. ``score_mask`` marks the answer and its first EOS only: the tokens a likelihood is
    reported per, the same tokens whatever the padding, so the AR model is scored on them alone.
    """
    columns = {key: [value] for key, value in row.items()}
    return {k: v[0] for k, v in encode_rows(columns, tokenizer, template, max_length, answer_pad_to).items()}


def encode_rows(
    rows: Mapping[str, Sequence[Any]],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    max_length: int,
    answer_pad_to: int | None = None,
) -> dict[str, list[Any]]:
    """``encode_row`` on a batch of rows given as columns (a ``datasets.map`` batch), plus ``length``.

    One batched tokenizer call for the prompts and one for the answers (the Rust tokenizer runs
    them in parallel). A module-level function with only token-relevant arguments, so that
    ``datasets.map`` fingerprints it by what changes the tokens (the cache then hits across runs).
    """
    n = len(next(iter(rows.values())))
    fmt = get_format(template)
    dict_rows = [{key: col[i] for key, col in rows.items()} for i in range(n)]
    for row in dict_rows:
        check_row(row)
    prompts = [fmt.prompt_text(row, tokenizer) for row in dict_rows]
    prompt_ids = tokenizer(prompts, add_special_tokens=fmt.add_special_tokens)["input_ids"]
    answer_ids = tokenizer([row["output"].strip() for row in dict_rows], add_special_tokens=False)[
        "input_ids"
    ]
    eos = fmt.end_id(tokenizer)  # the one end-of-answer id, for the answer's end and its padding
    out: dict[str, list[Any]] = {
        k: [] for k in ("input_ids", "answer_mask", "score_mask", "prompt_len", "truncated", "length")
    }
    for p_ids, a_ids in zip(prompt_ids, answer_ids):
        a_ids = list(a_ids) + [eos]
        n_scored = len(a_ids)
        if answer_pad_to:
            a_ids += [eos] * (-len(a_ids) % answer_pad_to)
        truncated = len(p_ids) + n_scored > max_length  # padding that does not fit is simply dropped
        a_ids = a_ids[: max(max_length - len(p_ids), 0)]
        n_scored = min(n_scored, len(a_ids))
        out["input_ids"].append(list(p_ids) + a_ids)
        out["answer_mask"].append([0] * len(p_ids) + [1] * len(a_ids))
        out["score_mask"].append([0] * len(p_ids) + [1] * n_scored + [0] * (len(a_ids) - n_scored))
        out["prompt_len"].append(len(p_ids))
        out["truncated"].append(truncated)
        out["length"].append(len(p_ids) + len(a_ids))
    return out


@dataclass
class DataReport:
    """What happened to the raw rows: nothing is dropped without being counted here."""

    rows: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    too_long: int = 0  # answer cut to fit max_length (the EOS may be lost)
    no_answer_room: int = 0  # prompt alone fills max_length: kept out of training, listed in rejected

    def summary(self) -> str:
        return (
            f"{self.rows} rows: {len(self.rejected)} rejected (malformed or no room for the answer), "
            f"{self.too_long} with the answer truncated to max_length"
        )


def load_rows(path: str, split: str = "train") -> datasets.Dataset:
    """A local JSON/JSONL file (or folder of them) with Alpaca keys, or a hub dataset id."""
    try:
        if os.path.exists(path):
            files = sorted(str(p) for p in Path(path).glob("*.json*")) if os.path.isdir(path) else [path]
            if not files:
                raise FileNotFoundError(f"no .json/.jsonl file in {path}")
            return datasets.load_dataset("json", data_files=files, split="train")
        return datasets.load_dataset(path, split=split)
    except Exception as err:  # datasets raises many types; all mean the same thing to the user
        raise RuntimeError(
            f"could not load data {path!r} ({type(err).__name__}: {err}).\n  Fix: point data.path at a local "
            ".json/.jsonl file with keys instruction/input/output, or give a hub dataset id on a machine "
            "with hub access (e.g. data.path=tatsu-lab/alpaca)."
        ) from err


class AlpacaDataModule(L.LightningDataModule):
    """Alpaca (hub or local file) -> train / val dataloaders of padded prompt/answer batches."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        path: str = "tatsu-lab/alpaca",
        split: str = "train",
        val_path: str | None = None,
        val_size: float | int = 0.02,
        template: str = "alpaca",
        max_length: int = 512,
        answer_pad_to: int | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        limit_train_rows: int | None = None,
        limit_val_rows: int | None = None,
        num_sample_prompts: int = 4,
        strict: bool = False,
        report_dir: str | None = None,
        pad_to_multiple_of: int | None = None,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.format = get_format(template)  # fails early on an unknown data.template
        # The one end-of-answer id (EOS, or the chat template's end of turn) for answers and padding.
        self.eos_id = end_of_answer_id(tokenizer, template)
        self.collate = Collator(tokenizer.pad_token_id, pad_to_multiple_of)
        self.report = DataReport()
        self.train_ds: datasets.Dataset | None = None
        self.val_ds: datasets.Dataset | None = None
        self.val_raw: datasets.Dataset | None = None

    # -- raw rows -------------------------------------------------------------------------------
    def _validate(self, ds: datasets.Dataset, name: str) -> datasets.Dataset:
        """Keep well-formed rows; count, log and record the others with their index and reason."""
        bad: list[dict[str, Any]] = []
        keep: list[int] = []
        i = 0
        for columns in ds.iter(batch_size=1000):  # column batches: 10x faster than row iteration
            for values in zip(*columns.values()):
                row = dict(zip(columns, values))
                try:
                    check_row(row)
                    keep.append(i)
                except MalformedRowError as err:
                    bad.append({"split": name, "index": i, "reason": str(err), "row": row})
                i += 1
        self.report.rows += len(ds)
        if bad:
            self.report.rejected.extend(bad)
            shown = "; ".join(f"row {b['index']}: {b['reason']}" for b in bad[:5])
            msg = f"{len(bad)} malformed row(s) in {name} data ({shown}{' ...' if len(bad) > 5 else ''})"
            if self.hparams.strict:
                raise MalformedRowError(
                    msg + ". Fix the rows or set data.strict=false to skip and report them."
                )
            log.warning("%s; skipped, listed in rejected_rows.jsonl", msg)
        return ds.select(keep) if bad else ds

    def _encode(self, ds: datasets.Dataset, name: str) -> datasets.Dataset:
        hp = self.hparams
        # Only what changes the tokens goes into the map call (and so into its cache fingerprint):
        # the rows, the tokenizer, the template, max_length and answer_pad_to. Not the run folder.
        out = ds.map(
            encode_rows,
            batched=True,
            batch_size=1000,
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "template": hp.template,
                "max_length": hp.max_length,
                "answer_pad_to": hp.answer_pad_to,
            },
            desc=f"tokenising {name}",
            remove_columns=ds.column_names,
        )
        self.report.too_long += sum(out["truncated"][:])
        # the prompt alone fills max_length: no answer token left (an int column, no list decoding)
        no_room = [i for i, (n, p) in enumerate(zip(out["length"][:], out["prompt_len"][:])) if n <= p]
        if no_room:
            self.report.no_answer_room += len(no_room)
            for i in no_room[:1000]:
                self.report.rejected.append(
                    {"split": name, "index": i, "reason": f"prompt alone fills max_length={hp.max_length}"}
                )
            log.warning(
                "%d %s row(s) have no room for the answer within max_length=%d; kept out. "
                "Raise data.max_length to keep them.",
                len(no_room),
                name,
                hp.max_length,
            )
            keep = sorted(set(range(len(out))) - set(no_room))
            out = out.select(keep)
        return out

    def _build(self) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset]:
        """(train, val) tokenised and the raw val rows; resets and fills ``self.report``."""
        hp = self.hparams
        self.report = DataReport()
        raw = self._validate(load_rows(hp.path, hp.split), "train")
        if hp.val_path:
            train_raw, val_raw = raw, self._validate(load_rows(hp.val_path, hp.split), "val")
        else:
            parts = raw.train_test_split(test_size=hp.val_size, seed=hp.seed, shuffle=True)
            train_raw, val_raw = parts["train"], parts["test"]
        if hp.limit_train_rows:
            train_raw = train_raw.select(range(min(hp.limit_train_rows, len(train_raw))))
        if hp.limit_val_rows:
            val_raw = val_raw.select(range(min(hp.limit_val_rows, len(val_raw))))
        return self._encode(train_raw, "train"), self._encode(val_raw, "val"), val_raw

    def prepare_data(self) -> None:
        """Tokenise once per node (Lightning calls this on local rank 0 only): it fills the
        ``datasets`` cache, from which every rank's ``setup`` then loads the same files."""
        self._build()

    def setup(self, stage: str | None = None) -> None:
        if self.train_ds is not None:
            return
        hp = self.hparams
        self.train_ds, self.val_ds, self.val_raw = self._build()
        log.info("data: %s; train %d, val %d", self.report.summary(), len(self.train_ds), len(self.val_ds))
        if hp.report_dir and self.report.rejected:
            Path(hp.report_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(hp.report_dir) / "rejected_rows.jsonl", "w") as f:
                for r in self.report.rejected:
                    f.write(json.dumps(r, default=str) + "\n")

    # -- fixed validation prompts for the sampler -----------------------------------------------
    def sample_prompts(self, n: int | None = None) -> list[dict[str, Any]]:
        """The first ``n`` validation rows as {prompt, prompt_ids, reference}, fixed across epochs."""
        self.setup()
        n = self.hparams.num_sample_prompts if n is None else n
        out = []
        for row in self.val_raw.select(range(min(n, len(self.val_raw)))):
            prompt = self.format.prompt_text(row, self.tokenizer)
            ids = self.format.prompt_ids(row, self.tokenizer)
            out.append(
                {"prompt": prompt, "prompt_ids": ids, "reference": row["output"].strip(), "row": dict(row)}
            )
        return out

    # -- loaders --------------------------------------------------------------------------------
    def _loader(self, ds: datasets.Dataset, batch_size: int) -> DataLoader:
        """The fixed-order loader (validation): never shuffled, never length-grouped."""
        return DataLoader(
            ds.with_format(columns=["input_ids", "answer_mask", "score_mask"]),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """The training order of ``diffllm.data.order``: a pure function of (seed, pass), split over
        the ranks, resumable at any batch (its position is checkpointed with the loops).

        ``group_by_length``: transformers' length grouping (a seeded permutation cut into
        mega-batches of 50 global batches, each sorted by length), so a batch holds rows of similar
        length (little padding) while the order stays random across mega-batches.
        """
        hp, ds = self.hparams, self.train_ds
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(
            len(ds),
            hp.batch_size,
            seed=hp.seed,
            lengths=ds["length"][:] if hp.group_by_length else None,
            num_replicas=world,
            rank=rank,
        )
        consumed = (lambda: trainer.fit_loop.total_batch_idx + 1) if trainer is not None else None
        return ResumableLoader(
            ds.with_format(columns=["input_ids", "answer_mask", "score_mask"]),
            batch_size=hp.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            consumed=consumed,
        )

    def val_dataloader(self) -> DataLoader:
        """Fixed order (never length-grouped), so ``evaluate`` reproduces ``val/nll_bound``."""
        return self._loader(self.val_ds, self.hparams.eval_batch_size or self.hparams.batch_size)
