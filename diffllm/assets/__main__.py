"""``python -m diffllm.assets [--force] [--out DIR]``: (re)build the tiny data, tokenizer and AR base."""

from __future__ import annotations

import argparse

from diffllm.assets import TINY_DIR, ensure_tiny_assets, missing_files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffllm.assets", description=__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even if the assets are complete")
    parser.add_argument("--out", default=str(TINY_DIR), help=f"output folder (default: {TINY_DIR})")
    args = parser.parse_args(argv)
    if not args.force and not missing_files(args.out):
        print(f"tiny assets already complete in {args.out}; pass --force to rebuild")
        return
    ensure_tiny_assets(force=True, out=args.out)


if __name__ == "__main__":
    main()
