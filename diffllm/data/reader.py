"""Alpaca rows read from JSON / JSONL as data, never guessed: every value is checked, nothing coerced.

``read_rows(path)`` parses each file with the ``json`` module (a JSONL file line by line, a JSON
array element by element), so a number where a string belongs rejects that one row instead of
turning a whole column into numbers (the ``datasets`` JSON builder falls back to pandas on mixed
types, and pandas coerces). The accepted rows become a ``datasets.Dataset`` with explicit string
``Features``, written to the ``datasets`` cache under a fingerprint of the files' bytes (so
``datasets.map`` caches the tokenisation across runs). Every row keeps where it came from
(``source_file``, ``source_line``: the 1-based line of the file where the row starts), so a row
rejected later (no room for its answer) is reported under the line the user can open.

Every problem is a ``Rejection`` (file, line, reason code, detail, the row's text). One policy per
reason: ``skip`` (counted, logged, listed in ``rejected_rows.jsonl``); ``data.strict=true`` turns
every reason into an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffllm.data.template import MalformedRowError, check_row

SOURCE_FILE, SOURCE_LINE = "source_file", "source_line"
ALPACA_KEYS = ("instruction", "input", "output")

# reason code -> what it means (every reason: skipped and counted; data.strict=true makes it an error)
REASONS = {
    "invalid_utf8": "the line is not valid UTF-8",
    "invalid_json": "not valid JSON (a truncated or broken line)",
    "not_an_object": "a JSON value that is not an object",
    "missing_field": "a required field (instruction, output) is missing or null",
    "not_a_string": "a field that must be a string holds another JSON type",
    "empty_instruction": "the instruction is empty or blank",
    "empty_output": "the output is empty or blank (nothing to learn but the end token)",
    "no_answer_room": "the prompt alone fills data.max_length: no room for the answer",
}


if TYPE_CHECKING:
    import datasets


class DataError(ValueError):
    """The data cannot be used as given; the message is one line naming the file, key and fix."""


@dataclass(frozen=True)
class Rejection:
    """A row kept out of training: where it is, why, and its text (for ``rejected_rows.jsonl``)."""

    file: str
    line: int
    reason: str  # a key of REASONS
    detail: str
    text: str
    split: str | None = None

    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _reason_of(err: MalformedRowError, row: Mapping[str, Any]) -> str:
    msg = str(err)
    if msg.startswith("missing"):
        return "missing_field"
    if "must be a string" in msg:
        return "not_a_string"
    return "empty_instruction"


def check_alpaca_row(row: Any) -> tuple[str, str] | None:
    """``None`` for a usable row, else (reason code, detail)."""
    if not isinstance(row, dict):
        return "not_an_object", f"a JSON {type(row).__name__}, not an object with {list(ALPACA_KEYS)}"
    try:
        check_row(row)
    except MalformedRowError as err:
        return _reason_of(err, row), str(err)
    if not row["output"].strip():
        return "empty_output", "empty 'output'"
    return None


def _clip(text: str, limit: int = 10_000) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _jsonl_rows(data: bytes, name: str) -> Iterator[tuple[int, Any, str] | Rejection]:
    """(line, value, text) per non-blank line, or a Rejection for a line that is not UTF-8 / JSON."""
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), 1):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield Rejection(
                name,
                number,
                "invalid_utf8",
                f"invalid UTF-8 at byte {err.start} of the line (byte {start + err.start} of the file)",
                _clip(raw.decode("utf-8", errors="replace")),
            )
            continue
        text = text.rstrip("\r")
        try:
            yield number, json.loads(text), text
        except json.JSONDecodeError as err:
            cut = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated")
            yield Rejection(
                name,
                number,
                "invalid_json",
                f"invalid JSON ({err.msg}: column {err.colno}){'; the line is cut short (truncated?)' if cut else ''}",
                _clip(text),
            )


def _array_rows(text: str, name: str) -> Iterator[tuple[int, Any, str] | Rejection]:
    """(line, value, text) per element of a top-level JSON array, the line where each starts.

    A syntax error ends the file: the elements after it cannot be located, so one Rejection
    covers the rest (from the line of the error).
    """
    decoder = json.JSONDecoder()
    ws = " \t\r\n"
    pos, n = text.index("[") + 1, len(text)
    counted = [0, 1]  # (position, its line): lines are counted forward only, once per character

    def line_of(p: int) -> int:
        counted[1] += text.count("\n", counted[0], p)
        counted[0] = p
        return counted[1]

    def skip(p: int) -> int:
        while p < n and text[p] in ws:
            p += 1
        return p

    pos = skip(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        pos = skip(pos)
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            yield Rejection(
                name,
                err.lineno,
                "invalid_json",
                f"invalid JSON ({err.msg}: column {err.colno}); the rest of the array cannot be read",
                _clip(text[pos : text.find("\n", err.pos) if "\n" in text[err.pos :] else n]),
            )
            return
        yield line_of(pos), value, text[pos:end]
        pos = skip(end)
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            return
        yield Rejection(
            name,
            line_of(pos),
            "invalid_json",
            "invalid JSON (expected ',' or ']' after an array element)"
            + ("; the file ends there (truncated?)" if pos >= n else ""),
            _clip(text[pos : pos + 200]),
        )
        return


def parse_file(path: str | Path) -> tuple[list[dict[str, Any]], list[Rejection]]:
    """(usable rows with ``source_file``/``source_line``, rejections) of one JSON or JSONL file.

    A file whose first non-blank character is ``[`` is a JSON array; anything else is JSON Lines.
    Extra keys are kept: a string as is, any other JSON value as its JSON text.
    """
    name = str(path)
    data = Path(path).read_bytes()
    if not data.strip():
        raise DataError(
            f"data file {name} is empty ({len(data)} bytes); give a .jsonl file with one "
            '{"instruction", "input", "output"} object per line, or a JSON array of them'
        )
    if data.lstrip()[:1] == b"[":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            raise DataError(
                f"data file {name} is not valid UTF-8 (byte {err.start}, line {line}); "
                "re-encode it as UTF-8 (a JSON array file is read whole)"
            ) from None
        items: Iterator[Any] = _array_rows(text, name)
    else:
        items = _jsonl_rows(data, name)
    rows: list[dict[str, Any]] = []
    rejected: list[Rejection] = []
    for item in items:
        if isinstance(item, Rejection):
            rejected.append(item)
            continue
        line, value, text = item
        problem = check_alpaca_row(value)
        if problem is not None:
            rejected.append(Rejection(name, line, problem[0], problem[1], _clip(text)))
            continue
        row = {k: (v if isinstance(v, str) or v is None else json.dumps(v)) for k, v in value.items()}
        row["input"] = row.get("input") or ""
        row[SOURCE_FILE], row[SOURCE_LINE] = name, line
        rows.append(row)
    return rows, rejected


def data_files(path: str | Path) -> list[Path]:
    """The JSON/JSONL files ``path`` names: the file itself, or the ``*.json*`` files of a folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.json*") if p.is_file())
        if not files:
            raise DataError(f"no .json/.jsonl file in the folder {path}; point data.path at a data file")
        return files
    return [path]


def _generate(files: tuple[str, ...], keys: tuple[str, ...], digest: str) -> Iterator[dict[str, Any]]:
    """The usable rows again, for ``Dataset.from_generator`` (``digest`` only keys its cache)."""
    for f in files:
        for row in parse_file(f)[0]:
            yield {k: row.get(k) for k in keys}


def rows_dataset(path: str | Path) -> tuple[datasets.Dataset, list[Rejection]]:
    """The usable rows of a local file (or folder) as a Dataset of strings, and the rejections.

    The dataset is written to the ``datasets`` cache under a fingerprint of the files' contents:
    the same bytes give the same dataset files (and so the same tokenisation cache).
    """
    import datasets

    files = data_files(path)
    rows: list[dict[str, Any]] = []
    rejected: list[Rejection] = []
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
        r, bad = parse_file(f)
        rows.extend(r)
        rejected.extend(bad)
    if not rows:
        return datasets.Dataset.from_dict({k: [] for k in ALPACA_KEYS}), rejected
    extra = sorted({k for r in rows for k in r} - {*ALPACA_KEYS, SOURCE_FILE, SOURCE_LINE})
    keys = [*ALPACA_KEYS, *extra, SOURCE_FILE, SOURCE_LINE]
    features = datasets.Features({k: datasets.Value("int64" if k == SOURCE_LINE else "string") for k in keys})
    ds = datasets.Dataset.from_generator(
        _generate,
        features=features,
        gen_kwargs={"files": tuple(str(f) for f in files), "keys": tuple(keys), "digest": digest.hexdigest()},
    )
    return ds, rejected


def hub_rows(path: str, split: str) -> tuple[datasets.Dataset, list[Rejection]]:
    """A hub dataset's rows (typed by its own files), checked row by row like a local file."""
    import datasets

    ds = datasets.load_dataset(path, split=split)
    name = f"{path}[{split}]"
    keep: list[int] = []
    rejected: list[Rejection] = []
    i = 0
    for columns in ds.iter(batch_size=1000):  # column batches: 10x faster than row iteration
        for values in zip(*columns.values()):
            row = dict(zip(columns, values))
            problem = check_alpaca_row(row)
            if problem is None:
                keep.append(i)
            else:
                text = json.dumps(row, default=str, ensure_ascii=False)
                rejected.append(Rejection(name, i + 1, problem[0], problem[1], _clip(text)))
            i += 1
    ds = ds.select(keep) if rejected else ds
    ds = ds.add_column(SOURCE_FILE, [name] * len(ds)).add_column(SOURCE_LINE, [k + 1 for k in keep])
    return ds, rejected


def read_rows(path: str, split: str = "train") -> tuple[datasets.Dataset, list[Rejection]]:
    """A local JSON/JSONL file (or folder of them) or a hub dataset id -> (usable rows, rejections)."""
    if os.path.exists(path):
        return rows_dataset(path)
    looks_local = (
        path.startswith(("/", ".", "~")) or path.endswith((".json", ".jsonl")) or path.count("/") > 1
    )
    if looks_local:
        raise DataError(
            f"data.path={path!r}: no such file or folder; point data.path at a local .json/.jsonl file "
            "with keys instruction/input/output (or give a hub dataset id such as tatsu-lab/alpaca)"
        )
    try:
        return hub_rows(path, split)
    except Exception as err:  # datasets raises many types; all mean the same thing to the user
        raise DataError(
            f"could not load data {path!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Fix: point data.path at a local .json/.jsonl file with keys instruction/input/output, or give "
            "a hub dataset id on a machine with hub access (e.g. data.path=tatsu-lab/alpaca)."
        ) from err


def count_reasons(rejected: list[Rejection]) -> dict[str, int]:
    """Rejections per reason code, most frequent first."""
    return dict(Counter(r.reason for r in rejected).most_common())


def describe(rejected: list[Rejection], limit: int = 3) -> str:
    """One line: counts per reason and the first few places (``file:line reason``)."""
    counts = ", ".join(f"{n} {reason}" for reason, n in count_reasons(rejected).items())
    shown = " | ".join(f"{r.where()} {r.detail}" for r in rejected[:limit])
    more = f" | ... {len(rejected) - limit} more" if len(rejected) > limit else ""
    return f"{counts}; first: {shown}{more}"
