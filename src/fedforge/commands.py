"""Sub-commands that live with the package that owns them (``fedforge generator``, ``fedforge synth``).

A module adds one with ``@register_command(name, help)`` on ``def cmd(args) -> int`` and ``@cmd.arguments`` on the
function that fills its parser. The registry names those modules (``populate``), so the command-line tool imports
them when it builds its parser, and none of them imports the tool.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from .registry import Registry


@dataclass
class Command:
    run: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    help: str


COMMANDS: Registry[Command] = Registry("command", populate=("fedforge.generative.cli", "fedforge.synth.cli",
                                                         "fedforge.integrations.flower_deploy", "fedforge.attacks.cli"))


def register_command(name: str, help: str) -> Callable[[Callable[[argparse.Namespace], int]],
                                                      Callable[[argparse.Namespace], int]]:
    """Decorator for a sub-command's handler; the handler's ``arguments`` decorator registers its parser filler."""

    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        cmd = Command(fn, lambda p: None, help)
        COMMANDS.add(name, cmd, summary=help)

        def arguments(adder: Callable[[argparse.ArgumentParser], None]) -> Callable[[argparse.ArgumentParser], None]:
            cmd.add_arguments = adder
            return adder

        fn.arguments = arguments  # type: ignore[attr-defined]
        return fn

    return deco
