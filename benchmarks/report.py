"""Writing a benchmark's results: JSON (raw), markdown (the table), PNG (the plot)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_outputs(report: dict, out: Path, markdown: Callable[[dict], str],
                  plot: Callable[[dict, Path], None] | None, indent: int = 2) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=indent) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    if plot is not None:
        plot(report, out.with_suffix(".png"))
