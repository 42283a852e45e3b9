"""Evaluate a checkpoint, an exported folder or every job of a multirun folder: load, then
``diffllm.evaluation.eval_report`` (the report of ``python -m diffllm.evaluate``).

    result = evaluate("outputs/<date>/<time>/checkpoints/last.ckpt", ar_ckpt_path=..., steps_grid=[8, 16])
    results, table = evaluate_multirun("multirun/<date>/<time>")

The keyword arguments are the keys of ``conf/evaluate.yaml`` (the command line passes its node as
is). Bad values are refused before anything is read (``config.schema``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffllm.config.schema import ValLikelihoodNode, check_node, check_positive, check_sampler_overrides
from diffllm.evaluation.eval_report import default_out_dir, evaluate_models, write_eval
from diffllm.evaluation.tables import format_comparison
from diffllm.inference.loading import ar_baseline_model, load_for_inference, run_datamodule
from diffllm.training.checkpoints import load_ar_sft

log = logging.getLogger(__name__)


def evaluate(
    ckpt_path: str | Path,
    *,
    data_path: str | Path | None = None,
    rows: int | None = None,
    gen_rows: int | None = None,
    out_dir: str | Path | None = None,
    device: str = "cpu",
    seed: int | None = None,
    batch_size: int | None = None,
    gen_batch_size: int = 16,
    likelihood: Mapping[str, Any] | None = None,
    sampler: Mapping[str, Any] | None = None,
    steps_grid: Sequence[int] | None = None,
    ar_baseline: bool = True,
    ar_ckpt_path: str | Path | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    prompt_overflow: str = "error",
    l2r_nll: bool = True,
    quality: Mapping[str, Any] | None = None,
    agreement_file: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint or exported folder; writes the report files and returns ``eval.json``'s content.

    rows: rows scored for likelihood (None: the rows training validated on, or all of ``data_path``);
    gen_rows: rows generated (None: as many as scored); likelihood: ``num_samples`` / ``method``
    replacing the run's ``val_likelihood``; sampler: fields replacing the checkpoint's sampler;
    steps_grid: step counts for the quality-vs-steps sweep (None: G/8, G/4, G/2, G that the block
    layout allows); ar_baseline: score and decode with the unadapted base too; ar_ckpt_path: an
    AR-SFT checkpoint (objective=ar) for its row; prompt_overflow: ``error`` or ``truncate_left``
    for prompts longer than the model's positions minus ``gen_length``; l2r_nll: the diffusion
    model's left-to-right NLL (the gap decomposed); quality: ``enabled``, ``rows``,
    ``tokens_per_step`` of the reference-free figures and quality vs compute; agreement_file:
    Alpaca rows on which every model's answers are compared with the base model's greedy answers
    (``evaluation.agreement``; ``eval.json``'s ``agreement``). ``out_dir``: None writes into the run
    folder (``eval_report.default_out_dir``).
    """
    started = time.perf_counter()
    # the arguments against the schema, before anything is read
    check_positive(
        {"rows": rows, "gen_rows": gen_rows, "batch_size": batch_size, "gen_batch_size": gen_batch_size}
    )
    check_sampler_overrides(dict(sampler or {}))
    if agreement_file is not None and not Path(agreement_file).is_file():
        raise FileNotFoundError(
            f"agreement_file={str(agreement_file)!r} does not exist; pass a .json/.jsonl file of Alpaca rows "
            "(the 100 shipped with diffllm: agreement_file='${asset:alpaca/alpaca_sample.json}')"
        )
    lk_given = {k: v for k, v in dict(likelihood or {}).items() if v is not None}
    if lk_given:
        check_node(ValLikelihoodNode, lk_given)
    im = load_for_inference(ckpt_path, device=device, trust_remote_code=trust_remote_code)
    config = im.sampler_config.with_overrides(sampler)
    dm = run_datamodule(im.cfg, im.tokenizer, data_path)
    # the unadapted base: the AR baseline's rows, and the reference of agreement_file
    base = ar_baseline_model(im, device) if ar_baseline or agreement_file is not None else None
    ar_sft = None
    if ar_ckpt_path is not None:
        ar_sft = load_ar_sft(ar_ckpt_path, im.tokenizer, device=device, trust_remote_code=trust_remote_code)
    result = evaluate_models(
        im.dlm,
        im.tokenizer,
        eos_id=im.eos_id,
        sampler=config,
        datamodule=dm,
        run_cfg=im.cfg,
        source=str(ckpt_path),
        ar_base=base if ar_baseline else None,
        ar_sft=ar_sft,
        ar_ckpt_path=ar_ckpt_path,
        data_path=data_path,
        rows=rows,
        gen_rows=gen_rows,
        device=device,
        seed=seed,
        batch_size=batch_size,
        gen_batch_size=gen_batch_size,
        likelihood=likelihood,
        steps_grid=steps_grid,
        progress=progress,
        prompt_overflow=prompt_overflow,
        l2r_nll=l2r_nll,
        quality=quality,
        agreement_file=agreement_file,
        agreement_base=base,
        started=started,
    )
    files = write_eval(result, default_out_dir(ckpt_path) if out_dir is None else out_dir)
    result["files"] = {k: str(v) for k, v in files.items()}
    return result


def multirun_jobs(folder: str | Path) -> list[Path]:
    """``<job>/checkpoints/last.ckpt`` of every job folder directly under ``folder`` (a Hydra multirun
    folder: ``multirun/<date>/<time>/``), sorted by job folder name."""
    return sorted(Path(folder).glob("*/checkpoints/last.ckpt"))


def evaluate_multirun(folder: str | Path, **kwargs: Any) -> tuple[dict[str, dict[str, Any]], Path]:
    """``evaluate`` every job of a multirun folder (each writes its own report into its job folder);
    writes ``comparison.md`` into ``folder`` (``tables.format_comparison``); returns ({job: result},
    that file)."""
    jobs = multirun_jobs(folder)
    if not jobs:
        raise FileNotFoundError(
            f"{str(folder)!r} holds no <job>/checkpoints/last.ckpt; pass a multirun folder "
            "(multirun/<date>/<time>), a .ckpt or an exported folder"
        )
    results = {}
    for ckpt in jobs:
        log.info("job %s", ckpt.parent.parent.name)
        results[ckpt.parent.parent.name] = evaluate(ckpt, **kwargs)
    path = Path(folder) / "comparison.md"
    path.write_text(f"# {len(jobs)} jobs of {folder}\n\n" + format_comparison(results) + "\n")
    return results, path
