"""Attacks on what clients upload, to measure what a defence (differential privacy, docs/privacy.md) protects.

:mod:`fedforge.attacks.dlg`: DLG / iDLG gradient inversion of one client's update (``fedforge attack dlg``).
Layer: uses ``core`` (it replays a run through the run session and the round engine); nothing below imports it.
"""
from .dlg import DLGResult, Replay, attack, replay, run_dlg

__all__ = ["DLGResult", "Replay", "attack", "replay", "run_dlg"]
