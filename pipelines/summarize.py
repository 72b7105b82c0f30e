"""Decode the JPEGs of tar shards with DALI and print only a summary (nothing is written but --failures).

    python -m pipelines.summarize --input build/sample --runner FnApiRunner

A dry run of the conversion pipelines: their reading and decoding flags (none of the output flags), the same
summary.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from pipelines import main_for, run_pipeline
from pipelines.options import SUMMARIZE_FLAGS, SUMMARIZE_HELP

PROG = "python -m pipelines.summarize"
DESCRIPTION = "Decode the JPEGs of webdataset-style tar shards with NVIDIA DALI and print a summary."


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Runs the pipeline with these command-line flags; returns the summary dict it printed."""
    return run_pipeline(argv, prog=PROG, description=DESCRIPTION, flags=SUMMARIZE_FLAGS,
                        helps=SUMMARIZE_HELP)


def main() -> None:
    main_for(run, PROG)


if __name__ == "__main__":
    main()
