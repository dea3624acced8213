"""Unseen clients (PFLlib's ``-nnc``/``-ften``): clients kept out of training that join after the last round.

With ``--new-clients N`` the last N client ids of the partition never take part in a round. The algorithm's context
holds the participants alone (``ctx.num_clients``, ``train_sizes``, ``test_sizes``), so client selection, per-client
server state and every evaluation record cover the participants only: a run of 25 clients of which 5 are new trains
exactly as a run on the 20 participants' part of the same partition, bit for bit. Their data is in the federation
all along (they are the partition's clients; a feature-shift partition gives them domains like everyone else).

After the last round (and the ``finetune`` stage of methods that have one) each new client receives the final global
model, ``global_params(eval_message(server, cid))``, and

1. is evaluated on its test data as received ("before");
2. fine-tunes that model for ``--fine-tune-epochs`` E epochs of plain local training on its own training data
   (``rt.train``: cross-entropy over all parameters, the run's local optimiser from a fresh state, the base learning
   rate ``--lr``, batches of ``--batch-size``), whatever the algorithm: an algorithm's own ``finetune`` is written for
   its participants' state (FedBABU's head, ...), and one protocol for every method makes the numbers comparable;
3. is evaluated again ("after"; equal to "before" when E = 0).

This is PFLlib's protocol (its new clients are plain FedAvg clients that fine-tune the server's global model with
SGD). The new clients are judged by the model's own output (logits). An algorithm without a global model
(``has_global`` false: FedPer, FedRep, FedProto, ...) gives a new client nothing to start from and is refused at
set-up, as is one whose global model does not fit a new client's architecture. The new clients' states never enter
the state store. The engine writes one metrics record with ``"stage": "new_clients"`` (see
:func:`new_client_record`); ``summary.json`` reports it under ``new_clients``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .algorithm import Algorithm, EvalResult
from .training import _summarize_view, summarize_groups

if TYPE_CHECKING:
    from .runtime import ClientRuntime

STAGE = "new_clients"  # the stage of the record
TASK = "new_client"  # the task kind a worker runs for one new client
EPOCHS = "new_client/epochs"  # the message entry that tells the worker how long to fine-tune
VIEWS = ("before", "after")


@dataclass(frozen=True)
class NewClients:
    """The clients kept out of training and the epochs they fine-tune for."""

    cids: tuple[int, ...]
    epochs: int = 0


def participants(num_clients: int, new: int) -> int:
    """The number of clients that train when the last ``new`` of ``num_clients`` are kept out."""
    if new and new >= num_clients:
        raise ConfigError(f"--new-clients {new} leaves none of the {num_clients} clients to train; use at most "
                          f"{num_clients - 1}, or raise --clients.")
    return num_clients - new


def check_new_clients(algo: Algorithm, num_clients: int, new: int, epochs: int) -> NewClients | None:
    """The new clients of a run (the last ``new`` ids), after checking at set-up that they can start from the
    algorithm's global model; None when there are none."""
    if not new:
        return None
    ctx = algo.ctx
    first = participants(num_clients, new)
    if not algo.has_global:
        raise ConfigError(f"{algo.name} keeps no global model (each client ends with its own), so a new client has no "
                          f"model to start from; --new-clients needs an algorithm with a global model (e.g. fedavg, "
                          f"fedprox, scaffold, ditto, fedrod).")
    cids = tuple(range(first, num_clients))
    known = set(ctx.archs[:first])
    by_arch: dict[str, int] = {}
    for cid in cids:
        if ctx.arch(cid) not in known:
            raise ConfigError(f"new client {cid} would own a {ctx.arch(cid)}, which no participant trains, so there is no "
                              f"global model for it; give the new clients architectures the participants have.")
        by_arch.setdefault(ctx.arch(cid), cid)
    with _rng_kept():  # a probe of the initial global model: it must draw nothing from the run's streams
        server = algo.init_server()
        for arch, cid in by_arch.items():
            params = algo.global_params(algo.eval_message(server, cid))
            problem = _misfit(params, ctx.build_model(arch).state_dict())
            if problem:
                raise ConfigError(f"{algo.name}'s global model does not fit new client {cid}'s {arch} ({problem}), so "
                                  f"new clients cannot start from it; use --new-clients with another algorithm.")
    return NewClients(cids, int(epochs))


def _misfit(params: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str:
    """What keeps ``params`` from being a whole model with the weights ``own`` ('' when nothing does)."""
    missing = [k for k in own if k not in params]
    if missing:
        return f"{len(missing)} of its {len(own)} weights missing, e.g. '{missing[0]}'"
    wrong = [k for k, v in own.items() if tuple(params[k].shape) != tuple(v.shape)]
    if wrong:
        return f"'{wrong[0]}' has shape {tuple(params[wrong[0]].shape)}, the model's {tuple(own[wrong[0]].shape)}"
    return ""


class _rng_kept:
    """Restores torch's, numpy's and Python's global random states on exit."""

    def __enter__(self) -> None:
        self.states = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())

    def __exit__(self, *exc: Any) -> None:
        torch.random.set_rng_state(self.states[0])
        np.random.set_state(self.states[1])
        random.setstate(self.states[2])


def message(algo: Algorithm, eval_message: Mapping[str, torch.Tensor], epochs: int) -> dict[str, torch.Tensor]:
    """What a new client receives: the global model's weights and the number of epochs to fine-tune for."""
    return {**algo.global_params(dict(eval_message)), EPOCHS: torch.tensor(int(epochs))}


def run_new_client(rt: ClientRuntime, msg: Mapping[str, torch.Tensor]) -> EvalResult:
    """A worker's task for one new client: load the global model, evaluate, fine-tune, evaluate again."""
    epochs = int(msg[EPOCHS]) if EPOCHS in msg else 0
    own = rt.model.state_dict()
    problem = _misfit(msg, own)
    if problem:
        raise ConfigError(f"the global model does not fit new client {rt.cid}'s {rt.arch} ({problem}).")
    rt.load({k: msg[k] for k in own})
    before = rt.evaluate()
    after = before
    if epochs > 0:
        rt.train(epochs=epochs, lr=rt.ctx.lr)
        after = rt.evaluate()
    return EvalResult(rt.cid, {"before": before, "after": after})


def new_client_record(results: Iterable[EvalResult], rounds: int, epochs: int,
                      groups: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """The metrics record of the new clients: ``before_acc``/``after_acc`` (pooled over their test samples),
    ``_loss``, the spread of their accuracies (``_acc_std``, ``_acc_min``, ``_acc_max``), ``_auc`` and
    ``_macro_f1``, each client's accuracy (``_acc_clients``, in the order of ``new_clients``) and, with ``groups``
    (e.g. the clients of each domain), ``<view>_acc_domain/<name>``."""
    results = list(results)
    rec: dict[str, Any] = {"round": rounds, "stage": STAGE, "new_clients": [r.cid for r in results],
                           "fine_tune_epochs": int(epochs)}
    for view in VIEWS:
        counts = [r.counts[view] for r in results]
        s = _summarize_view(counts)
        if s is None:
            continue
        rec |= {f"{view}_acc": s["acc"], f"{view}_loss": s["loss"]}
        rec |= {f"{view}_acc_{k}": s[k] for k in ("std", "min", "max")}
        rec |= {f"{view}_{k}": s[k] for k in ("auc", "macro_f1") if s[k] is not None}
        rec[f"{view}_acc_clients"] = [c.acc for c in counts]
    if groups:
        rec |= summarize_groups(results, groups)
    return rec
