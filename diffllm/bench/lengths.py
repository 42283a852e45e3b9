"""Alpaca-shaped sequence lengths for benchmarks, shipped as a histogram (never the rows).

    python -m diffllm.bench.lengths --data alpaca.json --tokenizer DIR [--template alpaca] [--out FILE]

counts the (prompt tokens, answer tokens) pair of every row, as ``encode_row`` would tokenise it
before the EOS and its padding, and writes the counts to ``alpaca_lengths.json`` beside this file.
``diffllm.bench.histogram.sample_lengths`` draws benchmark rows from it, so a throughput figure sees Alpaca's length mix
without the data (Alpaca is CC BY-NC) or its tokenizer (Llama 3's is gated) on the machine.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from diffllm.bench.histogram import HISTOGRAM
from diffllm.data.template import check_row, get_format


def length_pairs(rows: Iterable[Mapping], tokenizer, template: str = "alpaca") -> Counter:
    """Counter of (prompt tokens incl. the tokenizer's BOS, answer tokens without EOS)."""
    out: Counter = Counter()
    fmt = get_format(template)
    for row in rows:
        check_row(row)
        p = len(fmt.prompt_ids(row, tokenizer))
        a = len(tokenizer(row["output"].strip(), add_special_tokens=False)["input_ids"])
        out[(p, a)] += 1
    return out


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="JSON list (or JSONL) of Alpaca rows")
    p.add_argument("--tokenizer", required=True, help="a tokenizer folder")
    p.add_argument("--template", default="alpaca")
    p.add_argument("--source", default=None, help="what the rows are, for the provenance note")
    p.add_argument("--tokenizer-name", default=None, help="the tokenizer's name, for the provenance note")
    p.add_argument("--out", default=str(HISTOGRAM))
    args = p.parse_args(argv)
    text = Path(args.data).read_text()
    rows = (
        json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    )
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    counts = length_pairs(rows, tok, args.template)
    provenance = {
        "rows": len(rows),
        "source": args.source or Path(args.data).name,
        "tokenizer": args.tokenizer_name or args.tokenizer.rstrip("/").split("/")[-1],
        "template": args.template,
        "columns": "prompt tokens (incl. BOS if the tokenizer adds one), answer tokens (no EOS), rows",
    }
    lines = ",\n".join(f"  [{p_}, {a}, {c}]" for (p_, a), c in sorted(counts.items()))
    Path(args.out).write_text(
        f'{{\n"provenance": {json.dumps(provenance, indent=1)},\n"counts": [\n{lines}\n]\n}}\n'
    )
    print(f"{len(rows)} rows -> {len(counts)} length pairs in {args.out}")


if __name__ == "__main__":
    main()
