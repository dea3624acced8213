"""Run directories, metrics, summaries, reports and plots."""
from .rundir import RunDir, atomic_write_bytes, atomic_write_text, load_run
from .summary import summarize

__all__ = ["RunDir", "atomic_write_bytes", "atomic_write_text", "load_run", "summarize"]
