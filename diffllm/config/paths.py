"""Where the packaged config tree lives (a leaf module: anything may import it, it imports nothing)."""

from __future__ import annotations

from pathlib import Path

# ``diffllm/conf`` is a link to the top-level ``conf/`` in a checkout (editable install) and a copy of
# it inside a wheel (package data), so every CLI finds its configs from any directory either way.
CONF_DIR = (Path(__file__).resolve().parent.parent / "conf").resolve()
