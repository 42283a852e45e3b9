"""Conversion data that keeps what the model knew: its own instructions and its own greedy answers.

``data=self_generated`` trains on rows drawn from the chat model being converted, built once per
machine and cached (like the SmolLM2 folder):

1. **Instructions** (Magpie): the chat template's text up to the start of a user message's content
   (the system prompt included, as the template writes it for a one-message conversation; for
   SmolLM2 ``<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n``) is given to the model, which
   writes a user message: sampled (``temperature``, ``top_p``; round ``r`` seeded
   ``seed * 1_000_003 + r``), ``batch_size`` samples per call, up to ``max_instruction_tokens``,
   ending at the user turn's end token (the first token the template writes after a user message).
   Each sample gets the first reason of ``REASONS`` that applies (``empty`` and ``too_long`` always,
   the others as ``filters`` lists them, ``duplicate`` last) or is kept; every rejection is counted
   under its reason.
2. **Answers**: the model's greedy continuation (KV cache, batched, prompts sorted by length) of
   each kept instruction's chat prompt, exactly the prompt training feeds it
   (``ChatFormat.prompt_ids``), ending at the end-of-turn token (``ChatFormat.end_id``). An answer
   gets at most ``max_length - prompt`` tokens plus ``MARGIN``: one that has not ended when the row
   reaches ``data.max_length`` is kept, and the datamodule cuts it there, so no end token is
   trained where the model had not ended (the ``truncated`` rows of its report). Every row is then
   encoded by the datamodule's own ``encode_row``, which must give exactly the prompt, the model's
   tokens and (when the answer ended within ``max_length``) the end token; a row that does not
   (its text does not encode back to the model's tokens) is rejected as ``answer_retokenizes``.
3. **Files**: ``<cache>/self_generated/<model folder>-<key>/`` with ``train.jsonl`` and ``val.jsonl``
   (Alpaca rows ``instruction``, ``input`` = "", ``output``; ``val_rows`` rows chosen by a
   ``random.Random(seed)`` shuffle, the rest train, both in generation order) and
   ``build_info.json`` (settings, counts per reason, timings, samples), written last: a folder
   without it is an interrupted build. ``key`` hashes every setting, ``data.max_length``, this
   builder's version and the model's content (the SHA-256 of its folder's files), not its path.
4. **Shipped sets**: a folder of the same name under ``SHIPPED_DIR`` (``diffllm/assets/
   self_generated_sets/``, in the package) is a set built once and committed; a cache without the
   folder is filled from it by a copy (the files byte for byte, ``build_info.json`` gains
   ``installed_from``) instead of a build. The name is the key, so a shipped set is only found for
   exactly the settings and model content it was built from; anything else builds as before.

Cost (upper bounds on a loaded 2-core machine, one thread): docs/self-generated-data.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM

from diffllm.assets.smollm2 import cache_dir
from diffllm.config.schema import INSTRUCTION_FILTERS, SelfGeneratedNode, check_node
from diffllm.data.datamodule import encode_row
from diffllm.data.reader import DataError
from diffllm.data.template import ChatFormat, TemplateError
from diffllm.model.ar_generate import ar_generate
from diffllm.model.load import load_tokenizer, missing_folder_help

BUILD_VERSION = 1  # part of the key: bump when a change to this file changes the rows
FOLDER = "self_generated"
BUILD_INFO = "build_info.json"
SPLIT_FILES = {"train": "train.jsonl", "val": "val.jsonl"}
MARGIN = 8  # answer tokens generated past data.max_length: the cut falls inside the text, not at its end
SHIPPED_DIR = Path(__file__).resolve().parent / "self_generated_sets"  # sets built once, committed
SAMPLES_SHOWN = 5  # rejected samples per reason kept in build_info.json

# reason -> what it means (instructions; the first that applies, in this order)
REASONS = {
    "empty": "nothing but whitespace",
    "too_long": "no end of the user turn within max_instruction_tokens",
    "not_plain": "not a plain user message: special-token text, a role marker (user: / assistant:), an "
    "assistant-style opening (Sure, Certainly, As an AI, ...), control or replacement characters",
    "too_short": "fewer than min_instruction_words words",
    "repetitive": "a word 3-gram that occurs 3 times or more (a degenerate loop)",
    "not_a_request": "neither a question (a '?') nor a request (an imperative first word, or a phrase "
    "such as 'can you', 'I need', 'help me'); English only: drop it from filters for other languages",
    "duplicate": "the same as an earlier kept instruction after normalisation (case, whitespace, end "
    "punctuation)",
}
ALWAYS = ("empty", "too_long")  # a sample without them is no instruction at all
# reason -> what it means (answers)
ANSWER_REASONS = {
    "no_answer_room": "the chat prompt leaves no answer token within data.max_length",
    "empty_answer": "the model ended its turn at once",
    "answer_retokenizes": "the answer text does not encode back to the model's own tokens",
}
assert set(REASONS) == {*ALWAYS, *INSTRUCTION_FILTERS}

# The heuristics of not_a_request and not_plain (lower case).
REQUEST_VERBS = frozenset(
    """add analyse analyze arrange assess assume brainstorm build calculate categorize categorise
    change check choose classify code come compare compile compose compute construct continue convert
    correct count create critique debug decide define describe design detect determine develop devise
    discuss draft edit elaborate estimate evaluate explain expand extract find fix format formulate
    generate give guide help identify illustrate imagine implement improve include label let list
    make match name offer organize organise outline paraphrase pick plan please predict prepare
    present pretend produce propose provide rank rate recommend rephrase replace restate reverse
    review revise rewrite say select share shorten show simplify solve sort specify suggest summarize
    summarise teach tell think transform translate turn use verify walk write""".split()
)
REQUEST_PHRASES = (
    "can you", "could you", "would you", "will you", "can i", "how do i", "how can i", "how to",
    "i need", "i want", "i'd like", "i would like", "i'm looking for", "i am looking for",
    "help me", "tell me", "show me", "give me", "let me know", "please", "any tips", "any advice",
    "any suggestions", "any ideas", "i wonder", "i'm wondering", "i am wondering",
)  # fmt: skip
ASSISTANT_OPENINGS = (
    "sure", "certainly", "of course", "absolutely", "as an ai", "as a language model", "here is",
    "here's", "here are", "i'm sorry", "i am sorry", "i apologize", "i apologise", "great question",
)  # fmt: skip
_ROLE_MARKER = re.compile(r"^\s*(user|assistant|system|human|ai|bot|gpt)\s*:", re.IGNORECASE | re.MULTILINE)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")  # control characters, U+FFFD (broken bytes)
_WORD = re.compile(r"[\w']+")
_END_PUNCT = re.compile(r"[\s.!?;:,\"'`)\]]+$")
_SENTINEL = "\u2063diffllm-user\u2063"  # a user message no template changes


class SelfGeneratedError(DataError):
    """The self-generated data cannot be built as configured; the message names the key and the fix."""


# ----------------------------------------------------------------------------------- the filters


def normalise_instruction(text: str) -> str:
    """The duplicate-detection form: lower case, whitespace runs as one space, no end punctuation."""
    return _END_PUNCT.sub("", " ".join(text.lower().split()))


def is_repetitive(text: str, n: int = 3, times: int = 3) -> bool:
    """A word ``n``-gram that occurs ``times`` times or more (overlaps counted)."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def is_request(text: str) -> bool:
    """A question (any '?') or a request: an imperative first word or a request phrase (English)."""
    if "?" in text:
        return True
    lowered = " ".join(text.lower().replace("\u2019", "'").split())
    words = _WORD.findall(lowered)
    return bool(words) and (words[0] in REQUEST_VERBS or any(p in lowered for p in REQUEST_PHRASES))


def is_plain(text: str, special_tokens: Iterable[str] = ()) -> bool:
    """No special-token text, role marker, assistant-style opening, control or replacement character."""
    if (
        any(tok and tok in text for tok in special_tokens)
        or _ROLE_MARKER.search(text)
        or _CONTROL.search(text)
    ):
        return False
    opening = " ".join(text.lower().replace("\u2019", "'").split())
    return not any(re.match(re.escape(o) + r"\b", opening) for o in ASSISTANT_OPENINGS)


@dataclass
class InstructionFilter:
    """Classifies sampled instructions in order, remembering the kept ones (for ``duplicate``).

    ``reason(text, ended)`` is the first reason of ``REASONS`` that applies (``empty`` and
    ``too_long`` always, the others when in ``filters``), or None: the instruction is kept. Every
    call is counted in ``counts`` (``kept`` or the reason).
    """

    filters: Sequence[str] = INSTRUCTION_FILTERS
    min_words: int = 3
    special_tokens: Sequence[str] = ()
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)  # the kept instructions, normalised

    def _first_reason(self, text: str, ended: bool) -> str | None:
        checks = {
            "empty": lambda: not text.strip(),
            "too_long": lambda: not ended,
            "not_plain": lambda: not is_plain(text, self.special_tokens),
            "too_short": lambda: len(text.split()) < self.min_words,
            "repetitive": lambda: is_repetitive(text),
            "not_a_request": lambda: not is_request(text),
            "duplicate": lambda: normalise_instruction(text) in self.seen,
        }
        for name in REASONS:  # the documented order
            if (name in ALWAYS or name in self.filters) and checks[name]():
                return name
        return None

    def reason(self, text: str, ended: bool) -> str | None:
        why = self._first_reason(text, ended)
        self.counts[why or "kept"] += 1
        if why is None:
            self.seen.add(normalise_instruction(text))
        elif len(self.examples.setdefault(why, [])) < SAMPLES_SHOWN:
            self.examples[why].append(text)
        return why


# ----------------------------------------------------------------------------------- the prompts


def instruction_prompt(tokenizer: Any, model: str = "") -> tuple[list[int], int]:
    """(the token ids of the chat template up to a user message's content, the user turn's end id).

    The template renders a conversation of one user message (its default system prompt included);
    its text before the message is the prompt, and the first token after it ends the user turn.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise SelfGeneratedError(
            f"data=self_generated needs a chat model, and the tokenizer of {model or tokenizer.name_or_path!r} "
            "has no chat template. Fix: `+experiment=smollm2 data=self_generated`, or "
            "data.self_generated.model=<an instruct model folder with a chat template>"
        )
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False)
    if _SENTINEL not in text:
        raise TemplateError("the tokenizer's chat template drops the user's message; use another model")
    before, after = text.split(_SENTINEL, 1)
    end = tokenizer(after, add_special_tokens=False)["input_ids"]
    if not end:
        raise TemplateError(
            "the tokenizer's chat template writes nothing after a user message: no end of turn"
        )
    return tokenizer(before, add_special_tokens=False)["input_ids"], int(end[0])


def chat_row(instruction: str, output: str = "") -> dict[str, str]:
    return {"instruction": instruction, "input": "", "output": output}


# ----------------------------------------------------------------------------------- generation


def round_seed(seed: int, round_index: int) -> int:
    """The sampling seed of instruction round ``round_index``."""
    return seed * 1_000_003 + round_index


def sample_instructions(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    end_id: int,
    n: int,
    settings: SelfGeneratedNode,
    seed: int,
) -> list[tuple[str, bool]]:
    """``n`` sampled user messages (decoded, special tokens kept, stripped) and whether each ended."""
    out = ar_generate(
        model,
        [prompt_ids] * n,
        max_new_tokens=settings.max_instruction_tokens,
        eos_id=end_id,
        pad_id=tokenizer.pad_token_id,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=seed,
    )
    texts = [tokenizer.decode(t, skip_special_tokens=False).strip() for t in out.tokens]
    return list(zip(texts, out.ended))


@dataclass
class Answer:
    """One greedy answer: the tokens kept (at most the room + ``MARGIN``), whether it ended within the
    room (its end token is trained), and the room (``max_length - prompt`` tokens)."""

    prompt_ids: list[int]
    tokens: list[int]
    ended: bool
    room: int


def greedy_answers(
    model: Any, tokenizer: Any, instructions: Sequence[str], max_length: int, end_id: int, batch_size: int
) -> list[Answer | None]:
    """The model's greedy answers to ``instructions`` (None where the prompt leaves no room).

    Prompts sorted by length share a batch (less padding); each row's answer is cut at its own room
    + ``MARGIN``, so it does not depend on the batch it was in (up to floating-point ties).
    """
    fmt = ChatFormat()
    prompts = [fmt.prompt_ids(chat_row(i), tokenizer) for i in instructions]
    answers: list[Answer | None] = [None] * len(prompts)
    order = sorted((i for i, p in enumerate(prompts) if len(p) < max_length), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        room = {i: max_length - len(prompts[i]) for i in rows}
        out = ar_generate(
            model,
            [prompts[i] for i in rows],
            max_new_tokens=max(room.values()) + MARGIN,
            eos_id=end_id,
            pad_id=tokenizer.pad_token_id,
        )
        for i, tokens, ended in zip(rows, out.tokens, out.ended):
            answers[i] = Answer(
                prompts[i], tokens[: room[i] + MARGIN], ended and len(tokens) < room[i], room[i]
            )
    return answers


def answer_reason(
    instruction: str, answer: Answer | None, text: str, tokenizer: Any, max_length: int, end_id: int
) -> str | None:
    """Why a greedy answer cannot be a row (``ANSWER_REASONS``), or None.

    The row must encode (``data.datamodule.encode_row``, as training does) to exactly the prompt,
    the model's tokens up to ``max_length`` and, when the answer ended within it, the end token.
    """
    if answer is None:
        return "no_answer_room"
    if not text.strip():
        return "empty_answer"
    expected = answer.prompt_ids + answer.tokens[: answer.room] + ([end_id] if answer.ended else [])
    encoded = encode_row(chat_row(instruction, text), tokenizer, "chat", max_length)["input_ids"]
    return None if encoded == expected else "answer_retokenizes"


# ----------------------------------------------------------------------------------- the build


def settings_of(data: Mapping[str, Any] | DictConfig) -> tuple[SelfGeneratedNode, int]:
    """(the checked ``data.self_generated`` settings, ``data.max_length``) of a data node."""
    node = data.get("self_generated")
    if node is None:
        raise SelfGeneratedError(
            "${self_generated:...} reads data.self_generated, and this data node has none. Fix: pick "
            "data=self_generated (conf/data/self_generated.yaml), which sets it"
        )
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return check_node(SelfGeneratedNode, values), int(data["max_length"])


@lru_cache(maxsize=8)
def _folder_digest(folder: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def model_fingerprint(model: str) -> str:
    """The SHA-256 of a local model folder's files (names and contents; memoised per process while
    their sizes and times stay), or ``name:<id>`` for what is not a local folder (a hub id)."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return f"name:{model}"
    files = sorted(p for p in folder.iterdir() if p.is_file())
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _folder_digest(str(folder.resolve()), stamp)


def build_key(
    settings: SelfGeneratedNode, max_length: int, chat_template: str | None = None
) -> dict[str, Any]:
    """What the rows depend on: every setting but the model's path and the cache folder, the model's
    content, ``data.max_length``, a chat template given in place of the tokenizer's, the version."""
    values = {k: v for k, v in asdict(settings).items() if k not in ("model", "cache")}
    return {
        "version": BUILD_VERSION,
        "model": model_fingerprint(settings.model),
        "max_length": max_length,
        "chat_template": None
        if chat_template is None
        else hashlib.sha256(chat_template.encode()).hexdigest(),
        **values,
    }


def key_digest(key: Mapping[str, Any]) -> str:
    """The first 16 hex digits of the SHA-256 of a build key (the folder name's suffix)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def dataset_dir(settings: SelfGeneratedNode, max_length: int, chat_template: str | None = None) -> Path:
    """``<cache>/self_generated/<model folder name>-<first 16 hex digits of the key's SHA-256>``."""
    digest = key_digest(build_key(settings, max_length, chat_template))
    cache = Path(settings.cache).expanduser() if settings.cache else cache_dir()
    name = Path(str(settings.model).rstrip("/")).name or "model"
    return cache / FOLDER / f"{name}-{digest}"


def is_built(folder: str | Path) -> bool:
    return (Path(folder) / BUILD_INFO).is_file()


def shipped_copy(folder: str | Path) -> Path | None:
    """The shipped set of the same name as the cache folder ``folder`` (same key), or None."""
    shipped = SHIPPED_DIR / Path(folder).name
    return shipped if is_built(shipped) else None


def install_shipped(shipped: Path, staged: Path) -> dict[str, Any]:
    """Copy a shipped set into ``staged`` (its files byte for byte; ``build_info.json`` written last,
    with ``installed_from`` added); returns that build info."""
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    for name in SPLIT_FILES.values():
        shutil.copyfile(shipped / name, staged / name)
    info = json.loads((shipped / BUILD_INFO).read_text())
    info["installed_from"] = str(shipped)
    return info


def split_rows(rows: Sequence[dict[str, str]], val_rows: int, seed: int) -> tuple[list, list]:
    """(train, val): ``val_rows`` rows picked by a ``random.Random(seed)`` shuffle; both keep their order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val = set(order[:val_rows])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def _write_jsonl(rows: Iterable[Mapping[str, Any]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def check_chat_model(settings: SelfGeneratedNode, chat_template: str | None = None) -> Any:
    """The model's tokenizer, checked: the folder exists and the tokenizer has a chat template."""
    missing = missing_folder_help(settings.model)
    if missing is not None:
        raise SelfGeneratedError(f"data.self_generated.model: {missing}")
    tokenizer = load_tokenizer(settings.model)
    if chat_template is not None:  # tests: a template for a model without one (never written to disk)
        tokenizer.chat_template = chat_template
    instruction_prompt(tokenizer, settings.model)
    return tokenizer


def load_chat_model(settings: SelfGeneratedNode, chat_template: str | None = None) -> tuple[Any, Any]:
    """(the causal LM in float32, eval mode, on the GPU when there is one; its tokenizer)."""
    tokenizer = check_chat_model(settings, chat_template)  # before the weights load
    model = AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch.float32)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer


@dataclass
class BuildState:
    """Everything a build has made so far, saved after every round (``STATE``): a build that is
    stopped resumes at its next round and ends with the rows an uninterrupted build writes."""

    rounds: int = 0
    rows: list[dict[str, str]] = field(default_factory=list)
    instruction_counts: Counter = field(default_factory=Counter)
    instruction_examples: dict[str, list[str]] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)  # kept instructions, normalised (``duplicate``)
    unexamined: int = 0
    answer_counts: Counter = field(default_factory=Counter)
    answer_examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    ended_rows: int = 0
    answer_tokens: int = 0
    seconds: dict[str, float] = field(
        default_factory=lambda: {"instructions": 0.0, "answers": 0.0, "wall": 0.0}
    )
    cpu_seconds: dict[str, float] = field(
        default_factory=lambda: {"instructions": 0.0, "answers": 0.0, "all": 0.0}
    )
    sessions: int = 0  # processes that worked on the build (1: never interrupted)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(vars(self), ensure_ascii=False))  # (asdict breaks a Counter)
        tmp.replace(path)  # atomic: a kill leaves the previous round's state

    @classmethod
    def load(cls, path: Path) -> BuildState:
        values = json.loads(path.read_text())
        for key in ("instruction_counts", "answer_counts"):
            values[key] = Counter(values[key])
        return cls(**values)


STATE = "state.json"


def build(
    settings: SelfGeneratedNode,
    max_length: int,
    out: str | Path,
    *,
    chat_template: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Sample, filter, answer and write ``train.jsonl``, ``val.jsonl``, ``build_info.json`` into ``out``.

    Rounds of ``batch_size`` instruction samples until ``rows`` rows are made; a round examines its
    samples only until the rows still needed are kept (the rest are counted as ``unexamined``).
    The state is saved in ``out/state.json`` after every round; a build that finds one resumes.
    Returns the build info.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    out = Path(out)
    model, tokenizer = load_chat_model(settings, chat_template)
    out.mkdir(parents=True, exist_ok=True)
    state = BuildState.load(out / STATE) if (out / STATE).is_file() else BuildState()
    state.sessions += 1
    wall0, cpu0 = dict(state.seconds), dict(state.cpu_seconds)
    prompt_ids, user_end_id = instruction_prompt(tokenizer, settings.model)
    end_id = ChatFormat().end_id(tokenizer)
    special = [t for t in tokenizer.all_special_tokens if t]
    filt = InstructionFilter(
        settings.filters,
        settings.min_instruction_words,
        special,
        state.instruction_counts,
        state.instruction_examples,
        set(state.seen),
    )
    max_rounds = 5 + 50 * math.ceil(settings.rows / settings.batch_size)  # below 2 % kept: give up
    say(
        f"self-generated data: {settings.rows} rows from {settings.model} (max_length {max_length}, "
        f"seed {settings.seed}, temperature {settings.temperature}, top-p {settings.top_p})"
        + (f"; resuming at round {state.rounds + 1} with {len(state.rows)} rows" if state.rounds else "")
    )
    rows = state.rows
    while len(rows) < settings.rows:
        if state.rounds >= max_rounds or (state.rounds >= 5 and filt.counts["kept"] == 0):
            raise SelfGeneratedError(
                f"data.self_generated: {len(rows)} of {settings.rows} rows after {state.rounds} rounds of "
                f"{settings.batch_size} samples; rejected: {dict(filt.counts)}. Fix: drop filters from "
                "data.self_generated.filters (not_a_request is English only), or use another model"
            )
        t0, c0 = time.perf_counter(), time.process_time()
        samples = sample_instructions(
            model,
            tokenizer,
            prompt_ids,
            user_end_id,
            settings.batch_size,
            settings,
            round_seed(settings.seed, state.rounds),
        )
        state.seconds["instructions"] += time.perf_counter() - t0
        state.cpu_seconds["instructions"] += time.process_time() - c0
        kept: list[str] = []
        for n, (text, ended) in enumerate(samples):
            if len(kept) == settings.rows - len(rows):
                state.unexamined += len(samples) - n
                break
            if filt.reason(text, ended) is None:
                kept.append(text)
        t0, c0 = time.perf_counter(), time.process_time()
        answers = greedy_answers(model, tokenizer, kept, max_length, end_id, settings.batch_size)
        state.seconds["answers"] += time.perf_counter() - t0
        state.cpu_seconds["answers"] += time.process_time() - c0
        for instruction, answer in zip(kept, answers):
            text = "" if answer is None else tokenizer.decode(answer.tokens, skip_special_tokens=False)
            why = answer_reason(instruction, answer, text, tokenizer, max_length, end_id)
            state.answer_counts[why or "kept"] += 1
            if why is not None:
                if len(state.answer_examples.setdefault(why, [])) < SAMPLES_SHOWN:
                    state.answer_examples[why].append(chat_row(instruction, text))
                continue
            rows.append(chat_row(instruction, text))
            state.ended_rows += answer.ended
            state.answer_tokens += len(answer.tokens[: answer.room])
        state.rounds += 1
        state.seen = sorted(filt.seen)
        state.seconds["wall"] = wall0["wall"] + time.perf_counter() - started
        state.cpu_seconds["all"] = cpu0["all"] + time.process_time() - cpu_started
        state.save(out / STATE)
        say(
            f"  round {state.rounds}: {len(samples)} samples, {len(kept)} instructions kept, "
            f"{len(rows)}/{settings.rows} rows ({state.seconds['instructions']:.0f} s instructions, "
            f"{state.seconds['answers']:.0f} s answers; CPU {state.cpu_seconds['instructions']:.0f} s, "
            f"{state.cpu_seconds['answers']:.0f} s)"
        )
    train, val = split_rows(rows, settings.val_rows, settings.seed)
    _write_jsonl(train, out / SPLIT_FILES["train"])
    _write_jsonl(val, out / SPLIT_FILES["val"])
    answered = sum(state.answer_counts.values())
    wall, cpu = state.seconds, state.cpu_seconds
    info = {
        "settings": {**asdict(settings), "max_length": max_length},
        "key": build_key(settings, max_length, chat_template),
        "folder": str(out),
        "instruction_prompt": tokenizer.decode(prompt_ids, skip_special_tokens=False),
        "user_end_token": tokenizer.convert_ids_to_tokens(user_end_id),
        "answer_end_token": tokenizer.convert_ids_to_tokens(end_id),
        "rows": {"train": len(train), "val": len(val)},
        "instructions": {
            "rounds": state.rounds,
            "sampled": state.rounds * settings.batch_size,
            "unexamined": state.unexamined,
            "counts": dict(filt.counts.most_common()),
            "reasons": REASONS,
            "rejected_examples": filt.examples,
        },
        "answers": {
            "answered": answered,
            "counts": dict(state.answer_counts.most_common()),
            "reasons": ANSWER_REASONS,
            "rejected_examples": state.answer_examples,
            "ended_within_max_length": state.ended_rows,
            "cut_at_max_length": len(rows) - state.ended_rows,
            "mean_tokens_trained": round(state.answer_tokens / max(len(rows), 1), 2),
        },
        "seconds": {k: round(v, 1) for k, v in wall.items()},
        "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
        "sessions": state.sessions,
        "rate": {
            "instructions_kept_per_s": round(filt.counts["kept"] / max(wall["instructions"], 1e-9), 3),
            "samples_per_s": round(state.rounds * settings.batch_size / max(wall["instructions"], 1e-9), 3),
            "answers_per_s": round(answered / max(wall["answers"], 1e-9), 3),
            "instructions_kept_per_cpu_s": round(filt.counts["kept"] / max(cpu["instructions"], 1e-9), 3),
            "samples_per_cpu_s": round(
                state.rounds * settings.batch_size / max(cpu["instructions"], 1e-9), 3
            ),
            "answers_per_cpu_s": round(answered / max(cpu["answers"], 1e-9), 3),
        },
        "machine": {
            "device": str(next(model.parameters()).device),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    (out / STATE).unlink()
    (out / BUILD_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")  # last: the marker
    say(f"  done in {info['seconds']['wall']:.0f} s: {len(train)} train + {len(val)} val rows -> {out}")
    return info


def ensure_self_generated(
    settings: SelfGeneratedNode,
    max_length: int,
    *,
    chat_template: str | None = None,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """The data set's folder, built first if absent (or ``force``); one build per key at a time
    (a file lock: ranks or runs that start together wait for the first). A shipped set of the same
    key (``SHIPPED_DIR``) is copied in instead of a build, unless ``force``.

    The build happens in ``.<folder name>.partial`` beside it, renamed when complete, so the folder
    appears complete or not at all; a stopped build resumes there (``force`` starts it afresh).
    """
    folder = dataset_dir(settings, max_length, chat_template)
    if is_built(folder) and not force:
        return folder
    shipped = None if force else shipped_copy(folder)
    if shipped is None:
        check_chat_model(settings, chat_template)  # a model without chat template: one line, nothing written
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if is_built(folder) and not force:
            return folder
        staged = folder.parent / f".{folder.name}.partial"
        if force and staged.exists():
            shutil.rmtree(staged)
        if shipped is not None:
            info = install_shipped(shipped, staged)
        else:
            info = build(settings, max_length, staged, chat_template=chat_template, quiet=quiet)
        info["folder"] = str(folder)
        (staged / BUILD_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)  # same file system
    return folder


def dataset_file(data: Mapping[str, Any] | DictConfig, split: str) -> Path:
    """``train.jsonl`` or ``val.jsonl`` of the data node's self-generated set, built first if absent."""
    if split not in SPLIT_FILES:
        raise SelfGeneratedError(f"${{self_generated:{split}}}: the split is train or val")
    settings, max_length = settings_of(data)
    return ensure_self_generated(settings, max_length) / SPLIT_FILES[split]
