"""The Flower apps of fedforge's deployment (``fedforge deploy``; see :mod:`fedforge.integrations.flower`).

``server_app``: runs the experiments of its run config (key ``fedforge``, written by ``fedforge deploy server``)
through the round engine, with client work sent to the SuperNodes. ``client_app``: runs the tasks a wave message
carries on the node's own data (its node config: ``dataset``, ``client-id``, ``model``, ``state-dir``, ...), keeping
each client's state on the device. Importing this module needs Flower (``pip install 'fedforge[flower]'``).
"""
from __future__ import annotations

from typing import Any

from .flower import import_flwr

import_flwr()

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from .flower import answer_describe, handle_tasks, serve  # noqa: E402

server_app = ServerApp()
client_app = ClientApp()
_CACHE: dict[Any, Any] = {}  # one ClientApp process may serve several messages (warm executors): reuse its data


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    serve(grid, context)


def _answer(msg: Message, context: Context) -> Message:
    return Message(handle_tasks(msg, context, _CACHE), reply_to=msg)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return _answer(msg, context)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _answer(msg, context)


@client_app.query("fedforge")
def _tasks(msg: Message, context: Context) -> Message:
    return _answer(msg, context)


@client_app.query("describe")
def _describe(msg: Message, context: Context) -> Message:
    return answer_describe(msg, context)
