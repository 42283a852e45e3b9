"""lm-evaluation-harness with the diffusion model registered: lm-eval's own command line.

    python -m diffllm.harness --model_args pretrained=outputs/<run>/checkpoints/last.ckpt \\
        --tasks diffllm_tiny_mc,diffllm_tiny_gen --limit 60
    python -m diffllm.harness --model hf --model_args pretrained=diffllm/assets/tiny/ar_base,add_bos_token=true \\
        --tasks diffllm_tiny_mc --limit 60                           # the AR model, same tasks
    python -m diffllm.harness --model hf --model_args pretrained=<ar_sft run>/checkpoints/last.ckpt,add_bos_token=true \\
        --tasks diffllm_tiny_mc --limit 60                           # AR-SFT: merged into <ckpt>.hf/ first
    diffllm-harness ...                                               # the same, as a console script

It imports ``diffllm.harness.adapter`` (which registers ``diffllm_mdlm``), adds
``--model diffllm_mdlm`` when no ``--model`` is given and the project's tasks folder
(``diffllm/harness/tasks``: ``diffllm_tiny_mc``, ``diffllm_tiny_gen``) as ``--include_path`` (unless
you pass your own folder: lm-eval reads one), then
hands every argument to lm-eval's CLI (``lm_eval.__main__.cli_evaluate``): all its options work.
Needs the ``harness`` extra (``pip install 'diffllm[harness]'``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from diffllm.harness.hf_folder import ar_sft_folder


def harness_argv(argv: Sequence[str], tasks_dir: str) -> list[str]:
    """lm-eval's arguments: the ``run`` subcommand unless another is given, ``--model diffllm_mdlm`` unless
    given, ``--include_path <tasks_dir>`` unless given (lm-eval takes one folder)."""
    from diffllm.harness.adapter import MODEL_NAME

    args = list(argv)
    if args and args[0] in ("ls", "validate", "run"):
        command, args = args[0], args[1:]
    else:
        command = "run"
    if command == "run" and not any(a == "--model" or a.startswith("--model=") for a in args):
        args = ["--model", MODEL_NAME, *args]
    if command == "run" and _model_of(args) in ("hf", "hf-auto", "huggingface"):
        args = _ar_sft_as_folder(args)
    # lm-eval reads one --include_path folder: a user's own folder replaces the project's tasks
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", tasks_dir]
    return [command, *args]


def _model_of(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a == "--model" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--model="):
            return a.split("=", 1)[1]
    return None


def _ar_sft_as_folder(args: list[str]) -> list[str]:
    """``pretrained=<run>/checkpoints/x.ckpt`` (an AR-SFT checkpoint) -> the merged HF folder next to it."""
    out = list(args)
    for i, a in enumerate(out):
        if a == "--model_args" and i + 1 < len(out):
            parts = out[i + 1].split(",")
            for j, part in enumerate(parts):
                key, _, value = part.partition("=")
                if key.strip() == "pretrained" and value.endswith(".ckpt"):
                    parts[j] = f"pretrained={ar_sft_folder(value)}"
            out[i + 1] = ",".join(parts)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate

        from diffllm.harness.adapter import TASKS_DIR
    except ImportError as err:
        print(
            f"error: {err}; the harness needs lm-eval: pip install 'diffllm[harness]' (or -e '.[harness]')",
            file=sys.stderr,
        )
        sys.exit(1)
    argv = sys.argv[1:] if argv is None else list(argv)
    sys.argv = ["diffllm-harness", *harness_argv(argv, str(TASKS_DIR))]
    cli_evaluate()


if __name__ == "__main__":
    main()
