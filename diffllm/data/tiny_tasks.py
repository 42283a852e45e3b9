"""The project's own tiny task set: Alpaca-format rows whose answers can be checked exactly.

Six tasks over a 40-word vocabulary and small numbers, each phrased two ways so that both branches
of the prompt template are used (the whole problem in ``instruction`` with an empty ``input``, or a
generic ``instruction`` with the data in ``input``):

    copy     repeat a list of 3-6 distinct words          "cat dog sun"   -> "cat dog sun"
    reverse  the list in reverse order                     "cat dog sun"   -> "sun dog cat"
    sort     the list in alphabetical order                "sun cat dog"   -> "cat dog sun"
    add      the sum of two numbers in 0..9                "7 + 5"         -> "12"
    lookup   one key of 3-5 pairs, with its value          "a=3, b=7" (b)  -> "b=7"
    count    the number of words in a list of 3-6          "cat dog sun"   -> "3"

Generation is deterministic: the same ``(n, seed, split)`` gives byte-identical JSONL. The train and
val splits are disjoint by construction: a problem (instruction, input) belongs to the val split
iff a stable hash of it falls in one bucket out of ``VAL_BUCKETS``, and each split only keeps its
own problems, so no val prompt is ever seen in training.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from diffllm.data.template import MalformedRowError, check_row

# 40 common words, each a single BPE token (with or without a leading space)
_WORD_TEXT = (
    "apple bird blue boat book cake car cat cloud cold cup dog door egg fish green hat hill house "
    "king lamp leaf lion milk moon night pen rain red ring road rock rose salt ship snow star sun "
    "tree wind"
)
WORDS = tuple(_WORD_TEXT.split())
KEYS = tuple("abcdefgh")
TASKS = ("copy", "reverse", "sort", "add", "lookup", "count")
VAL_BUCKETS = 10  # one problem in VAL_BUCKETS belongs to the val split
ROW_KEYS = ("instruction", "input", "output", "task")

Problem = tuple[str, str, str]  # (instruction, input, output)


def _word_list(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(3, 6))


def _copy(rng: random.Random, with_input: bool) -> Problem:
    words = " ".join(_word_list(rng))
    if with_input:
        return "Repeat the words.", words, words
    return f"Repeat these words: {words}", "", words


def _reverse(rng: random.Random, with_input: bool) -> Problem:
    words = _word_list(rng)
    answer = " ".join(reversed(words))
    if with_input:
        return "Reverse the order of the words.", " ".join(words), answer
    return f"Reverse these words: {' '.join(words)}", "", answer


def _sort(rng: random.Random, with_input: bool) -> Problem:
    words = _word_list(rng)
    answer = " ".join(sorted(words))
    if with_input:
        return "Sort the words alphabetically.", " ".join(words), answer
    return f"Sort these words: {' '.join(words)}", "", answer


def _add(rng: random.Random, with_input: bool) -> Problem:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if with_input:
        return "Add the two numbers.", f"{a} + {b}", str(a + b)
    return f"What is {a} + {b}?", "", str(a + b)


def _lookup(rng: random.Random, with_input: bool) -> Problem:
    keys = rng.sample(KEYS, rng.randint(3, 5))
    values = [rng.randint(0, 9) for _ in keys]
    target = rng.randrange(len(keys))
    pairs = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
    # The answer restates the key ("b=7") so the value follows "b=" exactly as in the pairs, which
    # an induction head can copy; with the bare value the tiny AR base often picks a wrong key's value.
    answer = f"{keys[target]}={values[target]}"
    if with_input:
        return f"What is the value of {keys[target]}?", pairs, answer
    return f"Given {pairs}, what is {keys[target]}?", "", answer


def _count(rng: random.Random, with_input: bool) -> Problem:
    words = _word_list(rng)
    if with_input:
        return "How many words are in the list?", " ".join(words), str(len(words))
    return f"Count these words: {' '.join(words)}", "", str(len(words))


GENERATORS: dict[str, Callable[[random.Random, bool], Problem]] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "add": _add,
    "lookup": _lookup,
    "count": _count,
}


def split_of(instruction: str, input: str) -> str:
    """'val' or 'train': the split a problem belongs to, from a stable hash of its text."""
    digest = hashlib.blake2b(f"{instruction}\x00{input}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") % VAL_BUCKETS == 0 else "train"


def generate_rows(
    n: int,
    seed: int,
    split: str | None = None,
    generators: Mapping[str, Callable[[random.Random, bool], Problem]] | None = None,
) -> list[dict]:
    """``n`` rows {instruction, input, output, task}; deterministic in ``(n, seed, split)``.

    Tasks cycle in ``TASKS`` order (so every task gets n/6 rows) and each row's phrasing (with or
    without ``input``) is a fair coin. With ``split`` set to 'train' or 'val', problems of the other
    split are skipped (rejection sampling on ``split_of``), which makes the splits disjoint.
    ``generators`` (task -> generator, default ``GENERATORS``) draws another task set the same way
    (``diffllm.data.tiny_long_tasks``).
    """
    if split not in (None, "train", "val"):
        raise ValueError(f"split must be None, 'train' or 'val', got {split!r}")
    generators = GENERATORS if generators is None else generators
    tasks = tuple(generators)
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        task = tasks[len(rows) % len(tasks)]
        instruction, inp, output = generators[task](rng, rng.random() < 0.5)
        if split is not None and split_of(instruction, inp) != split:
            continue
        rows.append({"instruction": instruction, "input": inp, "output": output, "task": task})
    return rows


def _check_tiny_row(row: object, tasks: Sequence[str] = TASKS) -> None:
    if not isinstance(row, Mapping):
        raise MalformedRowError(f"a row must be a JSON object, got {type(row).__name__}: {row!r:.60}")
    check_row(row)
    if "task" in row and row["task"] not in tasks:
        raise MalformedRowError(f"unknown task {row['task']!r}; expected one of {list(tasks)}")


def write_jsonl(rows: Iterable[Mapping], path: str | Path, tasks: Sequence[str] = TASKS) -> Path:
    """Write rows as JSON lines (keys in ``ROW_KEYS`` order, UTF-8, '\\n' endings).

    Every row is validated first (its ``task`` one of ``tasks``); a malformed one raises
    ``MalformedRowError`` naming its line number (1-based) and nothing is written.
    """
    lines = []
    for lineno, row in enumerate(rows, start=1):
        try:
            _check_tiny_row(row, tasks)
        except MalformedRowError as err:
            raise MalformedRowError(f"{path}:{lineno}: {err}") from None
        ordered = {
            "instruction": row["instruction"],
            "input": row.get("input") or "",
            "output": row["output"],
        }
        ordered.update({k: v for k, v in row.items() if k not in ordered})
        lines.append(json.dumps(ordered, ensure_ascii=False) + "\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    return path


def read_jsonl(path: str | Path, tasks: Sequence[str] = TASKS) -> list[dict]:
    """Read JSON-lines rows; a malformed line raises ``MalformedRowError`` with its line number.

    Blank lines are skipped; anything else that is not a valid row (bad JSON, not an object, a
    missing key, a non-string field, a task not in ``tasks``) is an error, never silently dropped.
    """
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise MalformedRowError(
                    f"{path}:{lineno}: invalid JSON ({err.msg}): {line.strip()!r:.80}"
                ) from None
            try:
                _check_tiny_row(row, tasks)
            except MalformedRowError as err:
                raise MalformedRowError(f"{path}:{lineno}: {err}") from None
            rows.append(row)
    return rows
