"""Command lines: a typed node, one library call, printing. ``python -m diffllm.<name>`` runs them."""
