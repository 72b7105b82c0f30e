"""The beam-tarimg benchmark harness: ``python -m bench`` (see BENCHMARKS.md)."""
