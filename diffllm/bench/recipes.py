"""Conversion recipes against AR-SFT at equal budget: run a list, one run after another, one table.

    python -m diffllm.bench.recipes --recipes tiny                    # a shipped list (or a YAML file)
    python -m diffllm.bench.recipes --recipes smollm2-task --only block4,block4_ar_loss
    python -m diffllm.bench.recipes --recipes my.yaml --base '+experiment=smollm2 trainer.max_steps=100'
    python -m diffllm.bench.recipes --recipes tiny --dry-run          # the commands, nothing run
    python -m diffllm.bench.recipes --recipes tiny --table            # the table of what has finished

A recipe is a name and Hydra overrides of ``python -m diffllm.train`` (diffusion runs only), plus
optional ``shared`` overrides that its AR-SFT baseline gets too (the budget, the data). A recipe list
is a YAML file (``diffllm/bench/recipe_lists/*.yaml``; ``--recipes FILE`` for your own)::

    base: "+experiment=smollm2 trainer.max_steps=100"    # every run (replaced by --base)
    eval: "rows=256 gen_rows=256 steps_grid=[]"          # every python -m diffllm.evaluate
    recipes:
      block4: "model.attention=block_causal model.block_size=4 sampler.cache=block sampler.block_length=4"
      best_200:
        overrides: "model.attention=block_causal ..."
        shared: "trainer.max_steps=200"                 # AR-SFT at 200 steps too
        eval: "..."                                     # appended to the list's eval
      best_200_t30:
        extends: best_200                               # its overrides, shared and eval, then:
        overrides: "time_sampler.eps=0.3"

For each recipe, in ``--out`` (default ``outputs/recipes/<list>``):

1. the conversion: ``python -m diffllm.train <base> <shared> <overrides>`` into ``<recipe>/`` (it
   needs no baseline: a second runner trains its conversion while the first trains AR-SFT);
2. AR-SFT: ``python -m diffllm.train objective=ar <base> <shared>`` into ``ar-sft-<key>/``, where
   the key hashes the config it composes to, less what AR-SFT ignores (``ar_identity``: the block
   keys, the diffusion loss, time sampler, schedule, annealing, the sampler but its answer budget):
   trained once, reused by every recipe with the same key, in this invocation and the next, also
   from a base written differently (an existing ``ar-sft-*`` folder with the same key is found);
3. ``python -m diffllm.evaluate ckpt_path=<recipe>/checkpoints/last.ckpt
   ar_ckpt_path=ar-sft-<key>/checkpoints/last.ckpt <eval>``: the bound, the L2R NLL, AR-SFT's NLL,
   exact match of both on the same validation rows and prompts, paired differences with their
   SEs, tokens per forward pass (``diffllm.evaluation.scoring``), into ``<recipe>/eval.json``;
4. one line appended to ``results.jsonl``: the figures, wall times, machine load and the exact
   commands (every training attempt's). The table is rendered from that file alone.

Resumable: a recipe whose ``eval.json`` exists is skipped; a training run with a
``checkpoints/last.ckpt`` and no finished mark resumes from it (``ckpt_path=`` inside its own
folder, which ``diffllm.config.run_folder`` allows); a folder killed before its first checkpoint is
cleared and started again. Training runs get ``report.enabled=false`` (the evaluation replaces the
end-of-run report) and a checkpoint every ``--ckpt-every`` steps, so a kill loses at most that many.
Training wall time sums the attempts; an attempt whose runner was killed counts up to its last
checkpoint (the work kept; what a kill loses is not counted), so it estimates an uninterrupted run.
Every run's config is composed and checked before anything runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from diffllm.config.resolvers import compose
from diffllm.config.schema import check_run_config

LISTS_DIR = Path(__file__).resolve().parent / "recipe_lists"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
AR_PREFIX = "ar-sft-"
RESULTS = "results.jsonl"
STATE = "run.json"  # the runner's record of a run folder: overrides, attempts, finished mark

# What every training run gets from the runner (after the recipe's overrides: the runner's to keep).
TRAIN_EXTRA = ("report.enabled=false", "trainer.enable_progress_bar=false")
EVAL_EXTRA = ("progress=false",)

# Besides every top-level number of eval.json, these parts of it are kept in a results line.
KEPT_PARTS = ("reference_free", "quality_rows", "sampler", "likelihood")


class RecipeError(ValueError):
    """Bad recipe list, name or folder: one line naming what and the fix."""


# ----------------------------------------------------------------------------------- recipe lists


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    overrides: tuple[str, ...]  # the diffusion run only
    shared: tuple[str, ...] = ()  # the diffusion run and its AR-SFT baseline (budget, data)
    eval: tuple[str, ...] = ()  # appended to the list's eval overrides


@dataclasses.dataclass(frozen=True)
class RecipeList:
    name: str
    path: Path
    base: tuple[str, ...]
    eval: tuple[str, ...]
    recipes: dict[str, Recipe]
    description: str = ""


def split_overrides(text: str | Sequence[str] | None, where: str) -> tuple[str, ...]:
    """Hydra overrides from a shell-like string (``shlex``) or a list of strings."""
    if text is None:
        return ()
    if isinstance(text, str):
        try:
            parts = shlex.split(text)
        except ValueError as err:
            raise RecipeError(
                f"{where}: cannot split {text!r} into overrides ({err}); check its quotes"
            ) from None
    elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        parts = list(text)
    else:
        raise RecipeError(f"{where}: overrides must be a string or a list of strings, got {text!r}")
    bad = [p for p in parts if "=" not in p and not p.startswith("~")]
    if bad:
        raise RecipeError(f"{where}: {bad[0]!r} is not a Hydra override (key=value, +key=value, ~key)")
    return tuple(parts)


def resolve_list_path(recipes: str | Path) -> Path:
    """A shipped list name (``tiny``, ``smollm2-task``, ``smollm2-selfgen``, ``smollm2-selfgen-40``) or a YAML file."""
    path = Path(recipes)
    if path.is_file():
        return path
    shipped = LISTS_DIR / f"{recipes}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in LISTS_DIR.glob("*.yaml")))
    raise RecipeError(
        f"--recipes {recipes!r} is neither a file nor a shipped list; the shipped lists: {names}"
    )


def load_recipes(recipes: str | Path) -> RecipeList:
    """Read a recipe list (module docstring) and check its names and overrides."""
    path = resolve_list_path(recipes)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("recipes"), dict) or not data["recipes"]:
        raise RecipeError(f"{path}: expected a mapping with a non-empty 'recipes:' mapping (name: overrides)")
    unknown = sorted(set(data) - {"base", "eval", "recipes", "description"})
    if unknown:
        raise RecipeError(
            f"{path}: unknown top-level key(s) {unknown}; the keys are base, eval, recipes, description"
        )
    specs: dict[str, dict[str, Any]] = {}
    for name, spec in data["recipes"].items():
        name = str(name)
        where = f"{path}: recipe {name!r}"
        if not NAME.match(name) or name.startswith(AR_PREFIX):
            raise RecipeError(
                f"{where}: a name is letters, digits, _ . - and does not start with {AR_PREFIX!r}"
            )
        if spec is None or isinstance(spec, (str, list)):
            spec = {"overrides": spec}
        if not isinstance(spec, dict) or set(spec) - {"overrides", "shared", "eval", "extends"}:
            raise RecipeError(
                f"{where}: give a string of overrides or a mapping of overrides / shared / eval / extends"
            )
        specs[name] = spec
    out: dict[str, Recipe] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> Recipe:
        """``extends: parent``: the parent's overrides, then the recipe's own; the parent's shared
        unless the recipe gives its own; the parent's eval, then the recipe's own."""
        if name in out:
            return out[name]
        spec, where = specs[name], f"{path}: recipe {name!r}"
        overrides = split_overrides(spec.get("overrides"), where)
        shared = split_overrides(spec.get("shared"), f"{where} shared")
        evals = split_overrides(spec.get("eval"), f"{where} eval")
        parent_name = spec.get("extends")
        if parent_name is not None:
            parent_name = str(parent_name)
            if parent_name not in specs:
                raise RecipeError(f"{where}: extends {parent_name!r}, which is not a recipe of this list")
            if parent_name in chain:
                cycle = " -> ".join((*chain, name, parent_name))
                raise RecipeError(f"{where}: extends makes a cycle ({cycle}); break it")
            parent = resolve(parent_name, (*chain, name))
            overrides = (*parent.overrides, *overrides)
            shared = shared if "shared" in spec else parent.shared
            evals = (*parent.eval, *evals)
        out[name] = Recipe(name, overrides, shared, evals)
        return out[name]

    for name in specs:
        resolve(name, ())
    out = {name: out[name] for name in specs}  # file order
    return RecipeList(
        name=path.stem,
        path=path,
        base=split_overrides(data.get("base"), f"{path}: base"),
        eval=split_overrides(data.get("eval"), f"{path}: eval"),
        recipes=out,
        description=str(data.get("description") or ""),
    )


def select(recipe_list: RecipeList, only: str | None) -> list[Recipe]:
    """The recipes named in ``only`` (comma-separated, in that order), or all of them in file order."""
    if not only:
        return list(recipe_list.recipes.values())
    names = [n.strip() for n in only.split(",") if n.strip()]
    missing = [n for n in names if n not in recipe_list.recipes]
    if missing:
        raise RecipeError(
            f"--only {','.join(missing)}: not in {recipe_list.path}; its recipes: {', '.join(recipe_list.recipes)}"
        )
    return [recipe_list.recipes[n] for n in names]


# ----------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: its folder and the overrides that define it (folder keys excluded)."""

    label: str
    folder: Path
    overrides: tuple[str, ...]


# What objective=ar never reads (``ARObjective``: the causal model, next-token loss, no noise): the
# block keys, the diffusion loss, time sampler, schedule and annealing, the end-of-run report (off in
# the runner), and the sampler but for its answer budget (AR-SFT decodes validation prompts greedily).
# Two AR-SFT configs equal outside these train the same weights (tests/test_recipes.py trains both).
AR_IGNORED_NODES = ("loss", "time_sampler", "schedule", "anneal", "report", "module")
AR_IGNORED_MODEL_KEYS = ("attention", "block_size", "block_schedule", "clean_stream")


@functools.lru_cache(maxsize=256)
def ar_identity(overrides: tuple[str, ...]) -> str:
    """The AR-SFT run's composed config (``objective=ar`` and ``overrides``, interpolations as
    written) without what AR-SFT ignores, as canonical JSON."""
    cfg = OmegaConf.to_container(compose(["objective=ar", *overrides, "output_dir=/ar-sft"]), resolve=False)
    for node in AR_IGNORED_NODES:
        cfg.pop(node, None)
    for key in AR_IGNORED_MODEL_KEYS:
        cfg["model"].pop(key, None)
    cfg["sampler"] = {"gen_length": cfg["sampler"]["gen_length"]}
    return json.dumps(cfg, sort_keys=True, default=str)


def ar_key(base: Sequence[str], shared: Sequence[str]) -> str:
    """The AR-SFT baseline's identity: a hash of the config it trains with (``ar_identity``), so that
    bases written differently (``+experiment=smollm2`` and ``+experiment=smollm2_prefix_lm``, which
    differ in diffusion keys only) share one baseline, and any key AR-SFT reads gives another."""
    identity = ar_identity(tuple(o for o in (*base, *shared) if o != "objective=ar"))
    return hashlib.sha1(identity.encode()).hexdigest()[:10]


def ar_run(out: Path, base: Sequence[str], recipe: Recipe) -> Run:
    """The recipe's AR-SFT run: ``ar-sft-<key>/``, or an existing ``ar-sft-*`` folder whose recorded
    overrides compose to the same key (a folder named by the older string hash is reused, with its
    own overrides kept for its resume commands)."""
    key = ar_key(base, recipe.shared)
    folder = out / f"{AR_PREFIX}{key}"
    # its own folder first (perhaps trained from a base written differently), then older names
    states = [folder / STATE] if folder.exists() else sorted(out.glob(f"{AR_PREFIX}*/{STATE}"))
    for state_file in states:
        recorded = (read_json(state_file) or {}).get("overrides")
        if not isinstance(recorded, list):
            continue
        try:
            same = ar_key(tuple(recorded), ()) == key
        except Exception:  # noqa: BLE001 - a folder whose overrides no longer compose is not this one
            same = False
        if same:
            return Run(f"AR-SFT {key}", state_file.parent, tuple(recorded))
    return Run(f"AR-SFT {key}", folder, ("objective=ar", *base, *recipe.shared))


def diffusion_run(out: Path, base: Sequence[str], recipe: Recipe) -> Run:
    return Run(recipe.name, out / recipe.name, (*base, *recipe.shared, *recipe.overrides))


def last_ckpt(folder: Path) -> Path:
    return folder / "checkpoints" / "last.ckpt"


def train_argv(run: Run, ckpt_every: int | None, resume: bool) -> list[str]:
    """``python -m diffllm.train`` for ``run`` in its folder; ``resume``: from its own last.ckpt."""
    argv = ["-m", "diffllm.train", *run.overrides, *TRAIN_EXTRA]
    if ckpt_every:
        argv.append(f"callbacks.checkpoint.every_n_train_steps={int(ckpt_every)}")
    argv.append(f"hydra.run.dir={run.folder}")
    if resume:
        argv.append(f"ckpt_path={last_ckpt(run.folder)}")
    return argv


def eval_argv(run: Run, ar: Run, eval_overrides: Sequence[str]) -> list[str]:
    return [
        "-m",
        "diffllm.evaluate",
        f"ckpt_path={last_ckpt(run.folder)}",
        f"ar_ckpt_path={last_ckpt(ar.folder)}",
        *EVAL_EXTRA,
        *eval_overrides,
    ]


def shown(argv: Sequence[str], threads: int) -> str:
    """The command as a user would type it (the interpreter shown as ``python``)."""
    env = f"OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} "
    return env + shlex.join(["python", *argv])


# ----------------------------------------------------------------------------------- config checks


def first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def check_configs(runs: Sequence[Run], evals: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Compose every training run's config (as ``python -m diffllm.train`` would) and check it
    against the schema, and every evaluation's overrides; {label: the first line of its error}."""
    errors: dict[str, str] = {}
    for run in runs:
        try:
            check_run_config(compose([*run.overrides, *TRAIN_EXTRA, "output_dir=/nonexistent/check"]))
        except Exception as err:  # noqa: BLE001 - any failure to compose is this run's error
            errors[run.label] = first_line(err)
    for label, overrides in evals.items():
        try:
            compose(["ckpt_path=/nonexistent/check.ckpt", *EVAL_EXTRA, *overrides], config_name="evaluate")
        except Exception as err:  # noqa: BLE001
            errors.setdefault(label, "evaluate: " + first_line(err))
    return errors


# ----------------------------------------------------------------------------------- run folders


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, or None when it is missing or not (yet) valid JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    """Atomic: a kill leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def checkpoint_step(path: Path) -> int | None:
    """``global_step`` of a Lightning checkpoint, read as data (``weights_only``: no code runs), or
    None when it cannot be read (the run then starts again)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # noqa: BLE001 - truncated, another format, not a checkpoint
        return None


def finished_eval(folder: Path) -> dict[str, Any] | None:
    """The run's eval.json when its evaluation finished (written last, atomically), else None."""
    data = read_json(folder / "eval.json")
    return data if data and "nll_bound" in data else None


def close_killed_attempts(state: Mapping[str, Any], folder: Path) -> None:
    """Attempts without an end (their runner was killed) end at the last checkpoint they wrote: they
    count until then (the work kept; 0 when none was written). Called before the next attempt
    writes a checkpoint of its own."""
    ckpt = last_ckpt(folder)
    for a in state.get("attempts", []):
        if a.get("seconds") is None:
            kept = ckpt.stat().st_mtime - float(a["started"]) if ckpt.exists() else 0.0
            a.update(seconds=max(0.0, kept), rc=None, killed=True)


def train_seconds(state: Mapping[str, Any]) -> float:
    """Wall time of the training attempts (a killed one: until its last checkpoint)."""
    return float(sum(a.get("seconds") or 0.0 for a in state.get("attempts", [])))


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


LOCK = ".runner.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: Path, say: Callable[[str], None], poll: float = 10.0) -> Iterator[None]:
    """Hold ``folder/.runner.lock`` (this process's id) while working in ``folder``: a second runner
    on the same ``--out`` (two sharing the cores) waits for the first, then finds its work done.
    A lock whose process is gone (a killed runner) is taken over."""
    folder.mkdir(parents=True, exist_ok=True)
    path, waiting = folder / LOCK, False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                if not waiting:
                    say(f"[{folder.name}] another runner (pid {pid}) works here: waiting for it")
                    waiting = True
                time.sleep(poll)
            elif pid == 0:
                time.sleep(0.1)  # just created, its pid not written yet
                if path.exists() and not path.read_text().strip():
                    path.unlink(missing_ok=True)
            else:
                path.unlink(missing_ok=True)  # its runner is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


Launcher = Callable[[list[str], Path, Mapping[str, str]], int]


def launch(argv: list[str], log: Path, env: Mapping[str, str]) -> int:
    """``python <argv>`` with stdout and stderr into ``log``; its exit code. SIGINT/SIGTERM to the
    runner are passed on as SIGTERM (training then writes last.ckpt and exits 143) and waited for."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT, env=dict(env))
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise


class RunFailed(RuntimeError):
    pass


@dataclasses.dataclass
class Runner:
    """Runs recipes (module docstring); ``launcher`` runs one command (tests pass their own)."""

    out: Path
    base: tuple[str, ...]
    eval: tuple[str, ...]
    list_name: str
    threads: int = 1
    ckpt_every: int | None = 50
    dry_run: bool = False
    launcher: Launcher = launch
    say: Callable[[str], None] = lambda line: print(line, flush=True)
    planned: set[Path] = dataclasses.field(default_factory=set)  # a dry run's trainings already shown

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    # -- one training run, resumable

    def _state(self, run: Run) -> dict[str, Any]:
        state = read_json(run.folder / STATE)
        if state is None:
            return {
                "run_id": uuid.uuid4().hex,
                "label": run.label,
                "overrides": list(run.overrides),
                "attempts": [],
            }
        if state.get("overrides") != list(run.overrides):
            raise RecipeError(
                f"{run.folder} holds a run with other overrides ({shlex.join(state.get('overrides') or [])}); "
                f"this one is ({shlex.join(run.overrides)}): pass another --out, or remove that folder"
            )
        return state

    def ensure_trained(self, run: Run) -> dict[str, Any]:
        """Train ``run`` unless its folder holds a finished training; resume from its last.ckpt."""
        state = self._state(run)
        if state.get("trained") or run.folder in self.planned:
            return state
        ckpt = last_ckpt(run.folder)
        step = checkpoint_step(ckpt) if ckpt.exists() else None
        resume = step is not None
        argv = train_argv(run, self.ckpt_every, resume)
        what = f"resume from step {step}" if resume else "train"
        self.say(f"[{run.label}] {what}: {shown(argv, self.threads)}")
        if self.dry_run:
            self.planned.add(run.folder)
            return state
        if not resume and run.folder.exists():
            # killed before its first checkpoint: nothing to keep but the runner's own records
            for child in run.folder.iterdir():
                if child.name not in (STATE, LOCK) and not child.name.startswith("runner-"):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        close_killed_attempts(state, run.folder)
        attempt = {
            "command": shown(argv, self.threads),
            "python": sys.executable,
            "resume_from_step": step,
            "started": time.time(),
            "load_avg": load_avg(),
        }
        state["attempts"].append(attempt)
        write_json(run.folder / STATE, state)
        n = len(state["attempts"])
        log = run.folder / f"runner-train-{n}.log"
        rc = self.launcher(argv, log, self.env())
        attempt.update(rc=rc, seconds=time.time() - attempt["started"], ended=time.time())
        if rc == 0:
            state["trained"] = True
            state["train_seconds"] = train_seconds(state)
        write_json(run.folder / STATE, state)
        if rc != 0:
            raise RunFailed(f"[{run.label}] training exited {rc}; log: {log}\n{tail(log)}")
        self.say(f"[{run.label}] trained in {state['train_seconds']:.0f} s ({n} attempt(s))")
        return state

    # -- one recipe

    def _locked(self, folder: Path) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.dry_run else folder_lock(folder, self.say)

    def train_baseline(self, recipe: Recipe) -> None:
        """Only the recipe's AR-SFT baseline (``--baselines``): a second runner trains it while the
        first trains a conversion, instead of waiting for it after."""
        ar = ar_run(self.out, self.base, recipe)
        with self._locked(ar.folder):
            self.ensure_trained(ar)

    def run_recipe(self, recipe: Recipe, results: Path) -> dict[str, Any] | None:
        """AR-SFT (once per key), the conversion, its evaluation, its results line; None on a dry run."""
        try:
            ar = ar_run(self.out, self.base, recipe)
        except Exception as err:  # noqa: BLE001 - (--no-check) its AR-SFT config does not compose
            raise RunFailed(f"[{recipe.name}] AR-SFT config: {first_line(err)}") from None
        run = diffusion_run(self.out, self.base, recipe)
        eval_overrides = (*self.eval, *recipe.eval)
        with self._locked(run.folder):
            done = finished_eval(run.folder)
            if done is not None:
                self.say(f"[{recipe.name}] finished, skipped: {run.folder / 'eval.json'}")
                return None if self.dry_run else self._record(recipe, run, ar, eval_overrides, done, results)
            # the conversion first: it needs no baseline, so a second runner trains it while the first
            # holds the shared AR-SFT folder; the baseline is needed by the evaluation only
            state = self.ensure_trained(run)
            with self._locked(ar.folder):  # never held while waiting for a recipe's lock: no deadlock
                self.ensure_trained(ar)
            argv = eval_argv(run, ar, eval_overrides)
            self.say(f"[{recipe.name}] evaluate: {shown(argv, self.threads)}")
            if self.dry_run:
                return None
            started = time.time()
            state["eval"] = {"command": shown(argv, self.threads), "started": started, "load_avg": load_avg()}
            write_json(run.folder / STATE, state)
            log = run.folder / "runner-eval.log"
            rc = self.launcher(argv, log, self.env())
            state["eval"].update(rc=rc, seconds=time.time() - started)
            write_json(run.folder / STATE, state)
            done = finished_eval(run.folder)
            if rc != 0 or done is None:
                raise RunFailed(f"[{recipe.name}] evaluation exited {rc}; log: {log}\n{tail(log)}")
            return self._record(recipe, run, ar, eval_overrides, done, results)

    def _record(
        self,
        recipe: Recipe,
        run: Run,
        ar: Run,
        eval_overrides: Sequence[str],
        ev: Mapping[str, Any],
        results: Path,
    ) -> dict[str, Any]:
        """The recipe's results line (appended unless this evaluation is already in the file)."""
        state = read_json(run.folder / STATE) or {}
        ar_state = read_json(ar.folder / STATE) or {}
        eval_mtime = (run.folder / "eval.json").stat().st_mtime_ns
        for line in read_results(results):
            if line.get("run_id") == state.get("run_id") and line.get("eval_mtime_ns") == eval_mtime:
                return line
        figures = {k: v for k, v in ev.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        figures.update({k: ev[k] for k in ev if k in KEPT_PARTS or "agreement" in k})
        line = {
            "list": self.list_name,
            "recipe": recipe.name,
            "run_id": state.get("run_id"),
            "eval_mtime_ns": eval_mtime,
            "run_dir": str(run.folder),
            "ar_sft_dir": str(ar.folder),
            "ar_key": ar.folder.name[len(AR_PREFIX) :],
            "overrides": list(recipe.overrides),
            "shared": list(recipe.shared),
            "base": list(self.base),
            "eval_overrides": list(eval_overrides),
            "commands": {
                "ar_sft_train": [a["command"] for a in ar_state.get("attempts", [])],
                "train": [a["command"] for a in state.get("attempts", [])],
                "eval": (state.get("eval") or {}).get("command"),
            },
            "figures": figures,
            "train_seconds": state.get("train_seconds"),
            "ar_sft_train_seconds": ar_state.get("train_seconds"),
            "eval_seconds": (state.get("eval") or {}).get("seconds"),
            "train_attempts": len(state.get("attempts", [])),
            "load_avg": {
                "train": [a.get("load_avg") for a in state.get("attempts", [])],
                "eval": (state.get("eval") or {}).get("load_avg"),
            },
            "threads": self.threads,
            "provenance": ev.get("provenance"),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with open(results, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")
        return line


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join("    " + s for s in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------------- the table


def read_results(path: Path) -> list[dict[str, Any]]:
    """The lines of a results file (a torn last line, from a kill mid-write, is left out)."""
    if not path.exists():
        return []
    out = []
    for text in path.read_text().splitlines():
        try:
            out.append(json.loads(text))
        except ValueError:
            continue
    return out


def _pm(figures: Mapping[str, Any], key: str, digits: int = 3, scale: float = 1.0) -> str:
    value, se = figures.get(key), figures.get(f"{key}_se")
    if value is None or not math.isfinite(value):
        return "—"
    if se is None or not math.isfinite(se):
        return f"{value * scale:.{digits}f}"
    return f"{value * scale:.{digits}f} ± {se * scale:.{digits}f}"


def _num(value: Any, digits: int = 0) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _agreement(f: Mapping[str, Any], model: str) -> dict[str, Any]:
    return ((f.get("reference_free") or {}).get(model)) or {}


def _alpaca(f: Mapping[str, Any], model: str) -> dict[str, Any]:
    """A model's agreement with the base's greedy answers on ``evaluate``'s ``agreement_file``
    (``diffllm.evaluation.agreement``: exact match, first differing token)."""
    return (((f.get("agreement") or {}).get("models") or {}).get(model)) or {}


# (header, cell of a recipe's figures, cell of its AR-SFT baseline's figures)
COLUMNS: tuple[tuple[str, Callable[[Mapping], str], Callable[[Mapping], str]], ...] = (
    ("bound ± SE", lambda f: _pm(f, "nll_bound"), lambda f: "—"),
    ("L2R NLL", lambda f: _pm(f, "l2r_nll"), lambda f: "—"),
    ("AR-SFT NLL", lambda f: _pm(f, "ar_sft_nll"), lambda f: _pm(f, "ar_sft_nll")),
    ("bound − AR-SFT", lambda f: _pm(f, "gap_sft"), lambda f: "—"),
    ("exact match", lambda f: _pm(f, "diffusion_exact_match"), lambda f: _pm(f, "ar_sft_exact_match")),
    ("EM − AR-SFT", lambda f: _pm(f, "diffusion_minus_ar_sft_exact_match"), lambda f: "—"),
    ("bound − AR base", lambda f: _pm(f, "gap"), lambda f: "—"),
    (
        "agreement w/ AR base greedy",
        lambda f: _pm(_agreement(f, "diffusion"), "ar_agreement"),
        lambda f: _pm(_agreement(f, "ar_sft"), "ar_agreement"),
    ),
    (
        "tokens/pass",
        lambda f: _num(f.get("diffusion_tokens_per_pass"), 2),
        lambda f: _num(f.get("ar_sft_tokens_per_pass"), 2),
    ),
    (
        "Alpaca: EM w/ base greedy",
        lambda f: _pm(_alpaca(f, "diffusion"), "exact_match"),
        lambda f: _pm(_alpaca(f, "ar_sft"), "exact_match"),
    ),
    (
        "Alpaca: first diff (tokens)",
        lambda f: _pm(_alpaca(f, "diffusion"), "first_difference", 2),
        lambda f: _pm(_alpaca(f, "ar_sft"), "first_difference", 2),
    ),
    ("rows / prompts", lambda f: f"{f.get('rows', '—')} / {f.get('gen_rows', '—')}", None),
)
# Columns shown only when some line measured them.
OPTIONAL_COLUMNS: dict[str, Callable[[Mapping], bool]] = {
    "agreement w/ AR base greedy": lambda f: bool(_agreement(f, "diffusion")),
    "Alpaca: EM w/ base greedy": lambda f: bool(_alpaca(f, "diffusion")),
    "Alpaca: first diff (tokens)": lambda f: bool(_alpaca(f, "diffusion")),
}


def format_table(lines: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per recipe (its latest line) and one per AR-SFT baseline (its figures from
    its latest recipe); every figure ± its SE, gaps and exact-match differences paired over the same
    rows and prompts. The agreement columns appear when some evaluation measured them."""
    latest: dict[str, Mapping[str, Any]] = {}
    for line in lines:
        latest.pop(line["recipe"], None)  # re-run: the latest line, at its new place
        latest[line["recipe"]] = line
    columns = [
        c
        for c in COLUMNS
        if c[0] not in OPTIONAL_COLUMNS or any(OPTIONAL_COLUMNS[c[0]](x["figures"]) for x in latest.values())
    ]
    head = ["recipe", *(c[0] for c in columns), "train s", "eval s"]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    baselines: dict[str, list[Mapping[str, Any]]] = {}
    for name, line in latest.items():
        f = line["figures"]
        baselines.setdefault(line["ar_key"], []).append(line)
        cells = [name, *(cell(f) for _, cell, _ in columns)]
        cells += [_num(line.get("train_seconds")), _num(line.get("eval_seconds"))]
        out.append("| " + " | ".join(cells) + " |")
    notes = []
    for key, group in baselines.items():
        last = group[-1]
        f = last["figures"]
        budget = " ".join(last.get("shared") or []) or "the base budget"
        cells = [f"AR-SFT `{key}` ({budget})"]
        cells += [(ar or cell)(f) for _, cell, ar in columns]
        cells += [_num(last.get("ar_sft_train_seconds")), "—"]
        out.append("| " + " | ".join(cells) + " |")
        nlls = {round(g["figures"].get("ar_sft_nll", float("nan")), 9) for g in group}
        if len(nlls) > 1:
            notes.append(
                f"AR-SFT `{key}` scores differently across its recipes ({sorted(nlls)}): their evaluations "
                "did not use the same rows; compare only rows evaluated alike"
            )
    return "\n".join(out + [f"\n{n}" for n in notes])


def table_header(lines: Sequence[Mapping[str, Any]], results: Path) -> str:
    if not lines:
        return f"(no finished recipe in {results})"
    loads = [x for line in lines for x in (line.get("load_avg", {}).get("train") or []) if x]
    threads = sorted({line.get("threads") for line in lines})
    load = (
        f"; 1-min load average at training starts {min(a[0] for a in loads)}–{max(a[0] for a in loads)}"
        if loads
        else ""
    )
    return (
        f"{results}: {len(lines)} line(s); NLLs in nats per answer token (answer + end token), ± SE over "
        f"rows; bound − AR-SFT and EM − AR-SFT paired over the same rows / prompts; wall times on "
        f"{threads} torch thread(s){load}."
    )


# ----------------------------------------------------------------------------------- the command line


def main(argv: list[str] | None = None, launcher: Launcher = launch) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m diffllm.bench.recipes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--recipes",
        default="tiny",
        help="a shipped list (tiny, smollm2-task, smollm2-selfgen, smollm2-selfgen-40) or a YAML file",
    )
    ap.add_argument("--base", default=None, help="overrides for every run, replacing the list's base")
    ap.add_argument("--only", default=None, help="comma-separated recipe names, run in that order")
    ap.add_argument("--out", default=None, help="default: outputs/recipes/<list>")
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL (torch) threads of every run (default 1)")
    ap.add_argument(
        "--ckpt-every", type=int, default=50, help="checkpoint every N steps (0: the run's own cadence)"
    )
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--table", action="store_true", help="print the table of results.jsonl, run nothing")
    ap.add_argument("--keep-going", action="store_true", help="a failed recipe does not stop the others")
    ap.add_argument("--no-check", action="store_true", help="skip composing every config before running")
    ap.add_argument(
        "--baselines",
        action="store_true",
        help="train only the AR-SFT baselines of the selected recipes (a second runner, beside one running them)",
    )
    args = ap.parse_args(argv)
    try:
        recipe_list = load_recipes(args.recipes)
        out = Path(args.out) if args.out else Path("outputs") / "recipes" / recipe_list.name
        results = out / RESULTS
        if args.table:
            lines = read_results(results)
            print(table_header(lines, results) + "\n\n" + (format_table(lines) if lines else ""), flush=True)
            return 0
        if args.threads < 1:
            raise RecipeError(f"--threads {args.threads}: give 1 or more")
        base = split_overrides(args.base, "--base") if args.base is not None else recipe_list.base
        recipes = select(recipe_list, args.only)
        runner = Runner(
            out=out,
            base=base,
            eval=recipe_list.eval,
            list_name=recipe_list.name,
            threads=args.threads,
            ckpt_every=args.ckpt_every or None,
            dry_run=args.dry_run,
            launcher=launcher,
        )
        failed: dict[str, str] = {}
        if not args.no_check:
            runs, ar_labels = {}, {}
            for r in recipes:
                if finished_eval(out / r.name) is None:
                    try:
                        ar = ar_run(out, base, r)
                    except Exception as err:  # noqa: BLE001 - its AR-SFT config does not compose
                        failed[r.name] = f"config: AR-SFT: {first_line(err)}"
                        continue
                    runs[ar.label], ar_labels[r.name] = ar, ar.label
                    runs[r.name] = diffusion_run(out, base, r)
            errors = check_configs(
                list(runs.values()), {r.name: (*recipe_list.eval, *r.eval) for r in recipes}
            )
            for r in recipes:
                err = errors.get(r.name) or errors.get(ar_labels.get(r.name, ""))
                if err:
                    failed[r.name] = f"config: {err}"
            if failed:
                print(
                    "\n".join(f"[{name}] {err}" for name, err in failed.items()), file=sys.stderr, flush=True
                )
                if not args.keep_going:
                    raise RecipeError(
                        f"{len(failed)} recipe(s) do not compose; fix them, leave them out (--only), "
                        "or run the others with --keep-going"
                    )
        if not args.dry_run:
            out.mkdir(parents=True, exist_ok=True)
        for recipe in recipes:
            if recipe.name in failed:
                continue
            try:
                if args.baselines:
                    runner.train_baseline(recipe)
                    continue
                runner.run_recipe(recipe, results)
            except RunFailed as err:
                print(str(err), file=sys.stderr, flush=True)
                failed[recipe.name] = str(err).splitlines()[0]
                if not args.keep_going:
                    return 1
        if not args.dry_run and not args.baselines:
            lines = read_results(results)
            print("\n" + table_header(lines, results) + "\n\n" + format_table(lines), flush=True)
        if failed:
            print("not finished: " + "; ".join(f"{k} ({v})" for k, v in failed.items()), file=sys.stderr)
            return 1
        return 0
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped: the run in progress wrote its checkpoint; the same command resumes", file=sys.stderr)
        return 130


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # launch() passes it on and waits for the run's checkpoint


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm)
    sys.exit(main())
