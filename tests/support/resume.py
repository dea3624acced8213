"""Stop a run by a signal after a round and resume it from its run directory (the resume tests' common steps)."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from fedforge.config import build_config
from fedforge.core.faults import RunInterrupted
from fedforge.core.simulation import Simulation, resume_config


def stop_and_resume(overrides: dict[str, Any], run: Path, after_round: int = 1) -> Any:
    """Run ``overrides`` into ``run``, stopped by SIGTERM once round ``after_round`` is recorded (the run must raise
    RunInterrupted), then resume it from ``run`` to the end; returns the resumed run's result."""
    sim = Simulation(build_config(overrides=overrides), run_dir=run, progress=False,
                     on_record=lambda r: r["round"] == after_round and sim.request_stop(signal.SIGTERM))
    with pytest.raises(RunInterrupted):
        sim.run()
    return Simulation(resume_config(run), resume=run, progress=False).run()
