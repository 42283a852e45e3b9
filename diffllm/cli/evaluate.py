"""Evaluate a converted diffusion model against the AR model it came from.

    python -m diffllm.evaluate ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt
    python -m diffllm.evaluate ckpt_path=exports/tiny/merged data_path=rows.jsonl rows=200
    python -m diffllm.evaluate ckpt_path=... sampler.strategy=margin steps_grid=[8,16,32]
    python -m diffllm.evaluate ckpt_path=multirun/<date>/<time>      (every job, then comparison.md)

On the same answers (the run's validation split by default, or ``data_path``): the diffusion answer
NLL bound vs the base AR model's NLL and, with ``ar_ckpt_path``, an AR-SFT checkpoint's (the
baseline at equal budget), each ± its SE, gaps paired over rows, by answer length; generation
quality of every model (exact match, ROUGE-L, BLEU, length, EOS rate); the diffusion sampler's
quality against its number of steps; with ``agreement_file`` (e.g. the 100 shipped Alpaca
instructions), how close the diffusion model's and AR-SFT's answers stay to the base model's greedy
answers (``diffllm.evaluation.agreement``). Writes ``eval.json``, ``eval.md``, ``nll_by_length.png``
and ``quality_vs_steps.png`` into the run folder or ``out_dir``.

The library call: ``diffllm.inference.evaluate.evaluate`` (its keyword arguments are the keys of
``conf/evaluate.yaml``); the report: ``diffllm.evaluation.eval_report``; the tables:
``diffllm.evaluation.tables``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffllm.cli.support import set_keys
from diffllm.config.resolvers import hydra_main
from diffllm.evaluation.tables import format_comparison, format_report
from diffllm.inference.evaluate import evaluate, evaluate_multirun, multirun_jobs
from diffllm.model.load import ModelLoadError


def arguments(cfg: DictConfig) -> dict[str, Any]:
    """``evaluate``'s keyword arguments from the node (all keys but ``ckpt_path``, ``out_dir`` and
    Hydra's), interpolations resolved (``agreement_file='${asset:...}'``); ``sampler.*`` keys left at
    ??? keep the checkpoint's value."""
    kwargs = {
        k: v
        for k, v in OmegaConf.to_container(cfg, resolve=True).items()
        if k not in ("ckpt_path", "out_dir", "sampler")
    }
    kwargs["sampler"] = set_keys(cfg.sampler)
    kwargs["trust_remote_code"] = bool(kwargs["trust_remote_code"])
    return kwargs


def run(cfg: DictConfig) -> dict[str, Any]:
    """The CLI body (``conf/evaluate.yaml``): one checkpoint or export, or every job of a multirun folder."""
    kwargs = arguments(cfg)
    path = Path(cfg.ckpt_path)
    if path.is_dir() and multirun_jobs(path):  # a multirun folder: every job, then one table
        results, table = evaluate_multirun(path, **kwargs)
        print("\n" + format_comparison(results, markdown=False) + f"\n\n  comparison.md  {table}", flush=True)
        return {"jobs": results, "comparison": str(table)}
    result = evaluate(cfg.ckpt_path, out_dir=cfg.out_dir, **kwargs)
    print("\n" + format_report(result), flush=True)
    print("\n" + "\n".join(f"  {name:18s} {path}" for name, path in result["files"].items()), flush=True)
    return result


@hydra_main("evaluate")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ModelLoadError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
