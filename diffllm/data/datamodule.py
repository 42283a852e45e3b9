"""Alpaca-format data -> padded batches {input_ids, attention_mask, answer_mask, score_mask}.

A row renders through the prompt format (``data.template``) into prompt ids and an answer; tokens
are ``prompt_ids + answer_ids + [END]`` where END is the format's end-of-answer id (EOS, or the
chat template's end-of-turn token: ``diffllm.data.template.end_of_answer_id``), and
``answer_mask`` is True on ``answer_ids + [END]`` only (optionally also on extra END padding up to
a length bucket, LLaDA-style; ``score_mask`` then stays on ``answer_ids + [END]``: the tokens
likelihoods are reported per). Tokenisation runs
through ``datasets.map`` (batched, cached by fingerprint); batches are padded per batch.

Rows are read by ``diffllm.data.reader`` (parsed, never coerced). Rows that cannot be trained on
(malformed, empty output, no room for the answer within ``max_length``) are never silently
dropped: each is counted once, logged with its file, original line and reason, written with its
text to ``rejected_rows.jsonl`` in the run folder, and ``strict=True`` turns them into an error.
A file with no usable row, or a ``max_length`` that leaves no row room for an answer, is a
``DataError`` (one line naming the key and the fix).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from diffllm.data.collate import Collator
from diffllm.data.order import ResumableLoader, ResumableSampler
from diffllm.data.reader import (
    SOURCE_FILE,
    SOURCE_LINE,
    DataError,
    Rejection,
    count_reasons,
    describe,
    read_rows,
)
from diffllm.data.template import check_row, end_of_answer_id, get_format

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
    """What happened to the raw rows: nothing is dropped without being counted here.

    ``rows`` counts every row read (usable or not); each rejected row appears once in ``rejected``
    (file, original line, reason, text), whatever the stage that rejected it.
    """

    rows: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    too_long: int = 0  # answer cut to fit max_length (the EOS may be lost); no-room rows not included

    @property
    def no_answer_room(self) -> int:
        return sum(r.reason == "no_answer_room" for r in self.rejected)

    def counts(self) -> dict[str, int]:
        return count_reasons(self.rejected)

    def summary(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in self.counts().items())
        return (
            f"{self.rows} rows: {len(self.rejected)} rejected ({why or 'none'}), "
            f"{self.too_long} with the answer truncated to max_length"
        )


def load_rows(path: str, split: str = "train") -> datasets.Dataset:
    """The usable rows of a local JSON/JSONL file (or folder of them) or a hub dataset id.

    Rejections are dropped here; the datamodule (``read_rows``) reports them.
    """
    return read_rows(path, split)[0]


class AlpacaDataModule(L.LightningDataModule):
    """Alpaca (hub or local file) -> train / val dataloaders of padded prompt/answer batches.

    ``self_generated``: the build settings of ``data=self_generated`` (``path`` and ``val_path`` are
    its files); kept with the run's hyperparameters, and named when the files are missing.
    """

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
        self_generated: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(self_generated, DictConfig):  # plain values in the checkpoint (weights_only loads)
            self_generated = OmegaConf.to_container(self_generated, resolve=True)
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
        self._prepared: tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset] | None = None

    # -- raw rows -------------------------------------------------------------------------------
    def _key(self, split: str) -> str:
        return "data.val_path" if split == "val" and self.hparams.val_path else "data.path"

    def _read(self, path: str, split: str) -> datasets.Dataset:
        """The usable rows of ``path``; every other row is counted and recorded with its line."""
        if self.hparams.self_generated and not Path(path).exists():  # a run from another machine
            raise DataError(
                f"{self._key(split)}={path}: the self-generated data set this run was trained on is not in "
                "this machine's cache. Fix: rebuild it with the run's settings (`python -m diffllm.assets "
                "self_generated` with the run's data.self_generated.* and model overrides), or copy its folder"
            )
        ds, rejected = read_rows(path, self.hparams.split)
        self.report.rows += len(ds) + len(rejected)
        self.report.rejected.extend(dataclasses.replace(r, split=split) for r in rejected)
        if rejected:
            log.warning(
                "%s=%s: %d row(s) rejected: %s; %s",
                self._key(split),
                path,
                len(rejected),
                describe(rejected),
                "strict" if self.hparams.strict else "skipped, listed in rejected_rows.jsonl",
            )
        if len(ds) == 0:
            self.write_rejections()
            raise DataError(
                f"{self._key(split)}={path}: no usable row among {len(rejected)}: {describe(rejected)}"
                f"{self._listed()}. Fix the rows: each needs non-empty string 'instruction' and 'output' fields"
            )
        return ds

    def _listed(self) -> str:
        path = self.rejections_path()
        return f"; all rejected rows are listed in {path}" if path and self.report.rejected else ""

    def _refuse_if_strict(self) -> None:
        """``data.strict=true``: any rejected row is an error (after the list is written)."""
        if self.hparams.strict and self.report.rejected:
            self.write_rejections()
            raise DataError(
                f"data.strict=true and {len(self.report.rejected)} row(s) rejected: "
                f"{describe(self.report.rejected)}{self._listed()}. Fix the rows, or set data.strict=false "
                "to skip and count them"
            )

    def _encode(self, ds: datasets.Dataset, name: str) -> tuple[datasets.Dataset, list[int]]:
        """(tokenised rows, indices of ``ds`` kept): rows without room for the answer are rejected."""
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
            remove_columns=[c for c in ds.column_names if c not in (SOURCE_FILE, SOURCE_LINE)],
        )
        lengths, prompt_lens = out["length"][:], out["prompt_len"][:]
        # the prompt alone fills max_length: no answer token left (int columns, no list decoding)
        no_room = [i for i, (n, p) in enumerate(zip(lengths, prompt_lens)) if n <= p]
        truncated = out["truncated"][:]
        self.report.too_long += sum(t and n > p for t, n, p in zip(truncated, lengths, prompt_lens))
        if not no_room:
            return out, list(range(len(out)))
        for i, row in zip(no_room, ds.select(no_room)):
            text = json.dumps({k: row[k] for k in ds.column_names if k not in (SOURCE_FILE, SOURCE_LINE)})
            self.report.rejected.append(
                Rejection(
                    row[SOURCE_FILE],
                    row[SOURCE_LINE],
                    "no_answer_room",
                    f"the prompt is {prompt_lens[i]} tokens, data.max_length={hp.max_length}",
                    text,
                    name,
                )
            )
        log.warning(
            "%d %s row(s) have no room for the answer within data.max_length=%d (first: %s:%d); %s",
            len(no_room),
            name,
            hp.max_length,
            ds[no_room[0]][SOURCE_FILE],
            ds[no_room[0]][SOURCE_LINE],
            "strict"
            if hp.strict
            else "kept out, listed in rejected_rows.jsonl. Raise data.max_length to keep them",
        )
        if len(no_room) == len(out):
            self.write_rejections()
            shortest, longest = min(prompt_lens), max(prompt_lens)
            raise DataError(
                f"data.max_length={hp.max_length} leaves no room for an answer in any of the {len(out)} "
                f"{name} rows: the shortest prompt is {shortest} tokens (data.template={hp.template}), so "
                f"data.max_length must be at least {shortest + 1} (the prompt and one answer token); "
                f"{longest + 2} gives every prompt room for an answer token and the end token"
            )
        no_room_set = set(no_room)
        keep = [i for i in range(len(out)) if i not in no_room_set]
        return out.select(keep), keep

    def _build(self) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset]:
        """(train, val) tokenised and the raw val rows; resets and fills ``self.report``."""
        hp = self.hparams
        self.report = DataReport()
        raw = self._read(hp.path, "train")
        if hp.val_path:
            train_raw, val_raw = raw, self._read(hp.val_path, "val")
        else:
            parts = raw.train_test_split(test_size=hp.val_size, seed=hp.seed, shuffle=True)
            train_raw, val_raw = parts["train"], parts["test"]
        self._refuse_if_strict()
        if hp.limit_train_rows:
            train_raw = train_raw.select(range(min(hp.limit_train_rows, len(train_raw))))
        if hp.limit_val_rows:
            val_raw = val_raw.select(range(min(hp.limit_val_rows, len(val_raw))))
        train_ds, _ = self._encode(train_raw, "train")
        val_ds, val_kept = self._encode(val_raw, "val")
        self._refuse_if_strict()
        if len(val_kept) < len(val_raw):  # the sample prompts are rows that validation scores
            val_raw = val_raw.select(val_kept)
        return train_ds, val_ds, val_raw

    def rejections_path(self) -> Path | None:
        """``<run folder>/rejected_rows.jsonl`` (None without ``report_dir``)."""
        return Path(self.hparams.report_dir) / "rejected_rows.jsonl" if self.hparams.report_dir else None

    def write_rejections(self) -> Path | None:
        """Write every rejected row (file, line, reason, detail, text, split) as one JSON line."""
        path = self.rejections_path()
        if path is None or not self.report.rejected:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for r in self.report.rejected:
                f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        return path

    def prepare_data(self) -> None:
        """Tokenise once per node (Lightning calls this on local rank 0 only): it fills the
        ``datasets`` cache, from which every rank's ``setup`` then loads the same files. The same
        process's ``setup`` reuses this build, so each rejected row is logged once."""
        self._prepared = self._build()

    def setup(self, stage: str | None = None) -> None:
        if self.train_ds is not None:
            return
        prepared, self._prepared = self._prepared, None
        self.train_ds, self.val_ds, self.val_raw = prepared or self._build()
        log.info("data: %s; train %d, val %d", self.report.summary(), len(self.train_ds), len(self.val_ds))
        self.write_rejections()

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
