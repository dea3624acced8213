"""Flower deployment: every registered algorithm on real devices, through the same round engine as a simulation.

Optional extra: ``pip install 'fedforge[flower]'``. Flower (``flwr``) is imported only where it is used; the Flower
apps themselves (``ServerApp``/``ClientApp`` objects) live in :mod:`fedforge.integrations.flower_app`, and the
``fedforge deploy`` command in :mod:`fedforge.integrations.flower_deploy`.

Design (see ``docs/deploy.md``):

* **Server.** The ServerApp builds one :class:`~fedforge.core.simulation.Simulation` per experiment and runs it
  unchanged (round engine, run directory, checkpoints, metrics, failures, summary). Only its executor differs: a
  :class:`FlowerExecutor`, which sends each :class:`~fedforge.core.runtime.Task` (kind, round, client id, message
  tensors) to the SuperNode that owns client ``cid`` and returns the node's ``Update``/``EvalResult`` exactly as a
  local worker would. The engine therefore counts the same ``bytes_up``/``bytes_down`` (``nbytes`` of the messages it
  moves), draws the same seeds, and aggregates with the same server hooks.
* **Lock-step experiments.** Several experiments (``--algorithm fedavg,ditto,fedproto``) share one deployment: each
  runs in its own thread, and a :class:`FlowerHub` sends one Flower message per node per *wave* holding every
  experiment's tasks for that node. Server-side code runs one experiment at a time (a turn lock that an experiment
  gives up only while it waits for its clients), and every server hook reseeds before it draws, so each experiment
  gives the numbers it gives alone. Flower's per-message latency (a SuperNode polls every few seconds, a ClientApp
  process starts per message) is paid once per wave, not once per experiment.
* **Clients.** The ClientApp runs a Task with the same :class:`~fedforge.core.runtime.Worker` as a simulation, on the
  node's own data (``dataset``, ``client-id``, ``label-map`` in the SuperNode's node config) and its own architecture
  (``model``). A client's state never leaves the device: it persists between rounds in a checksummed
  :class:`~fedforge.core.store.DiskStore` under the node's ``state-dir``; the server keeps none.
* **Start-up.** The ServerApp first asks every node to describe itself (client id, architecture, data sizes and
  class counts, input shape, classes): that is what the algorithm's :class:`~fedforge.core.context.Context` needs.
* **Deadline.** A wave waits at most ``round_timeout`` seconds: a node that has not answered by then is left out,
  its training task logged as a :class:`~fedforge.core.faults.ClientFailure` of kind ``timeout`` (failures.jsonl).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from ..core.algorithm import ALGORITHMS, EvalResult, Update
from ..core.context import Context
from ..core.executors import EXECUTORS, Executor, release_memory, task_threads, torch_threads
from ..core.faults import ClientFailure
from ..core.runtime import Task, Worker, WorkerSpec
from ..core.training import EvalCounts
from ..errors import ConfigError, DataError

log = logging.getLogger("fedforge")

INSTALL_HINT = "Flower deployment needs Flower: pip install 'fedforge[flower]' (or pip install 'flwr>=1.42,<2')."
TASKS = "fedforge.tasks"  # ConfigRecord of a wave message: the tasks it carries (JSON)
LANES = "fedforge.lanes"  # ConfigRecord: each experiment's algorithm, hyper-parameters and Context (JSON)
DESCRIBE = "query.describe"
UNANSWERED = {3, 4, 5}  # Flower's ErrorCode MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE, NODE_UNAVAILABLE: no answer


def import_flwr():
    try:
        import flwr  # noqa: F401
        from flwr import app  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return flwr


# ------------------------------------------------------------------------------------------ records
_NUMPY_LESS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8} \
    if hasattr(torch, "float8_e4m3fn") else {torch.bfloat16: torch.int16}


def tensors_to_records(d: dict[str, torch.Tensor] | None) -> tuple[Any, dict[str, str]]:
    """(ArrayRecord, layout) of a flat dict of tensors. ``layout`` keeps the names in order and the torch dtype of
    each entry (numpy has no bfloat16: such tensors travel as their bits)."""
    from flwr.app import Array, ArrayRecord

    rec = ArrayRecord()
    layout: dict[str, str] = {}
    for k, t in (d or {}).items():
        t = t.detach().to("cpu")
        carrier = _NUMPY_LESS.get(t.dtype)
        arr = (t.view(carrier) if carrier is not None else t).contiguous().numpy()
        rec[k] = Array(np.ascontiguousarray(arr))
        layout[k] = str(t.dtype).removeprefix("torch.")
    return rec, layout


def records_to_tensors(rec: Any, layout: dict[str, str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, dtype_name in layout.items():
        arr = rec[k].numpy()
        t = torch.from_numpy(np.array(arr, copy=True))
        dtype = getattr(torch, dtype_name)
        out[k] = t.view(dtype) if dtype in _NUMPY_LESS else t
    return out


def counts_to_json(c: EvalCounts) -> tuple[dict[str, Any], np.ndarray | None]:
    d = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "confusion"}
    d["auc"] = None if d["auc"] != d["auc"] else d["auc"]  # NaN → null (JSON)
    return d, c.confusion


def counts_from_json(d: dict[str, Any], confusion: np.ndarray | None) -> EvalCounts:
    d = dict(d)
    d["auc"] = float("nan") if d.get("auc") is None else float(d["auc"])
    return EvalCounts(**d, confusion=confusion)


# ------------------------------------------------------------------------------------- node side
@dataclass
class NodeSettings:
    """What a SuperNode's node config says about the fedforge client it hosts (``flower-supernode --node-config``;
    ``fedforge deploy client`` writes it)."""

    dataset: str
    client_id: int
    model: str
    state_dir: str
    data_root: str | None = None
    label_map: str | None = None
    num_classes: int | None = None
    train_ratio: float = 0.75
    seed: int = 0
    device: str = "cpu"
    threads: int = 0

    KEYS = {"dataset": "dataset", "client-id": "client_id", "model": "model", "state-dir": "state_dir",
            "data-root": "data_root", "label-map": "label_map", "num-classes": "num_classes",
            "train-ratio": "train_ratio", "seed": "seed", "device": "device", "threads": "threads"}

    @classmethod
    def from_node_config(cls, cfg: dict[str, Any]) -> NodeSettings:
        missing = [k for k in ("dataset", "client-id", "model") if k not in cfg]
        if missing:
            raise ConfigError(f"this SuperNode's node config lacks {', '.join(missing)}; start it with "
                              f"`fedforge deploy client --dataset ... --client-id ... --model ...`.")
        kw: dict[str, Any] = {}
        for key, field_name in cls.KEYS.items():
            if key in cfg and cfg[key] != "":
                kw[field_name] = cfg[key]
        kw.setdefault("state_dir", str(Path.home() / ".cache" / "fedforge" / "flower-states"))
        s = cls(**kw)
        s.client_id, s.seed, s.threads = int(s.client_id), int(s.seed), int(s.threads)
        s.train_ratio = float(s.train_ratio)
        s.num_classes = int(s.num_classes) if s.num_classes not in (None, "", 0) else None
        if s.client_id < 0:
            raise ConfigError(f"client-id must be >= 0, got {s.client_id}.")
        return s

    def node_config(self) -> dict[str, Any]:
        """The node-config entries (the inverse of :meth:`from_node_config`; unset entries left out)."""
        out: dict[str, Any] = {}
        for key, field_name in self.KEYS.items():
            v = getattr(self, field_name)
            if v is not None:
                out[key] = v
        return out


def parse_label_map(spec: str | None) -> dict[int, int]:
    """'3:0,7:1' → {3: 0, 7: 1} (the node's label → the federation's label)."""
    out: dict[int, int] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        try:
            a, b = (int(v) for v in item.split(":", 1))
        except ValueError:
            raise ConfigError(f"label-map entry '{item}' is not of the form NODE_LABEL:LABEL (e.g. 3:0,7:1).") from None
        if a < 0 or b < 0:
            raise ConfigError(f"label-map entry '{item}': labels must be >= 0.")
        if a in out:
            raise ConfigError(f"label-map maps label {a} twice.")
        out[a] = b
    return out


@dataclass
class NodeData:
    """A node's own data: the dataset (labels remapped), and this client's train and test indices into it."""

    dataset: Any  # fedforge.data.Dataset
    train: np.ndarray
    test: np.ndarray

    def class_counts(self, num_classes: int, part: str) -> list[int]:
        idx = self.train if part == "train" else self.test
        return np.bincount(self.dataset.y[idx], minlength=num_classes).tolist()


def load_node_data(s: NodeSettings) -> NodeData:
    """The node's data: a dataset with its own client split (``pfllib:DIR``; ``client-id`` picks the client), or a
    file that holds this node's samples alone (``npz:FILE``, ...; split into train and test by ``train-ratio``)."""
    from ..data import load_dataset, make_partition

    ds = load_dataset(s.dataset, s.data_root)
    mapping = parse_label_map(s.label_map)
    if mapping:
        lut = np.arange(max(int(ds.y.max()) + 1, max(mapping) + 1), dtype=np.int64)
        for a, b in mapping.items():
            lut[a] = b
        y = lut[ds.y]
        ds = dataclasses.replace(ds, y=y, num_classes=max(ds.num_classes, int(y.max()) + 1), class_names=None)
    if s.num_classes is not None:
        if int(ds.y.max()) >= s.num_classes:
            raise DataError(f"num-classes {s.num_classes} is too small for this node's labels (up to {int(ds.y.max())}).")
        ds = dataclasses.replace(ds, num_classes=s.num_classes)
    if ds.client_split is not None:
        if s.client_id >= len(ds.client_split):
            raise ConfigError(f"{s.dataset} ships a split of {len(ds.client_split)} clients (0..{len(ds.client_split) - 1}); "
                              f"client-id {s.client_id} is not one of them.")
        tr, te = ds.client_split[s.client_id]
        train, test = np.asarray(tr, np.int64), np.asarray(te, np.int64)
    else:
        part = make_partition(ds.y, ds.num_classes, "iid", 1, s.seed, train_ratio=s.train_ratio)
        train, test = part.train[0], part.test[0]
    if len(train) == 0:
        raise DataError(f"client {s.client_id} has no training samples in {s.dataset}.")
    return NodeData(ds, train, test)


def describe(s: NodeSettings, data: NodeData) -> dict[str, Any]:
    """What the server needs to know about this node (no sample leaves it: sizes and class counts only)."""
    from ..models import MODELS

    ds = data.dataset
    if s.model not in MODELS:
        MODELS.get(s.model)  # raises with a suggestion
    return {"cid": s.client_id, "arch": s.model, "dataset": ds.name, "modality": ds.modality,
            "input_shape": list(ds.input_shape), "sample_shape": list(ds.x.shape[1:]), "dtype": str(ds.x.dtype),
            "num_classes": int(ds.num_classes), "vocab_size": ds.vocab_size,
            "train_counts": data.class_counts(ds.num_classes, "train"),
            "test_counts": data.class_counts(ds.num_classes, "test")}


class NodeRuntime:
    """The client side of one ClientApp process: the node's data, one Worker per experiment, the state stores."""

    def __init__(self, settings: NodeSettings, run_id: int):
        self.s = settings
        self.run_id = int(run_id)
        self.data = load_node_data(settings)
        self.workers: dict[int, Worker] = {}
        self.stores: dict[int, Any] = {}

    def state_store(self, lane: int):
        from ..core.store import DiskStore

        if lane not in self.stores:
            path = Path(self.s.state_dir).expanduser() / f"run-{self.run_id}" / f"experiment-{lane}"
            self.stores[lane] = DiskStore(path, fresh=False)
        return self.stores[lane]

    def worker(self, lane: int, spec: dict[str, Any]) -> Worker:
        if lane in self.workers:
            return self.workers[lane]
        from ..core.executors import set_deterministic
        from ..data import Partition

        ctx_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["ctx"].items()}
        ctx = Context(**{**ctx_fields, "device": self.s.device})
        if ctx.arch(self.s.client_id) != self.s.model:
            raise ConfigError(f"the server expects client {self.s.client_id} to be a {ctx.arch(self.s.client_id)}, "
                              f"this node holds a {self.s.model}.")
        algo = ALGORITHMS.get(spec["algorithm"]).create(spec["params"], ctx)
        n = ctx.num_clients
        empty = np.zeros(0, np.int64)
        train = [self.data.train if c == self.s.client_id else empty for c in range(n)]
        test = [self.data.test if c == self.s.client_id else empty for c in range(n)]
        ds = dataclasses.replace(self.data.dataset, num_classes=ctx.num_classes, client_split=None)
        part = Partition(train, test, "flower")
        set_deterministic(bool(spec.get("deterministic")))
        w = Worker(WorkerSpec(ds, part, algo, bool(spec.get("augment")), self.s.threads, device=self.s.device,
                              deterministic=bool(spec.get("deterministic"))))
        self.workers[lane] = w
        return w

    def run(self, lane: int, spec: dict[str, Any], kind: str, rnd: int, message: dict[str, torch.Tensor]) -> Any:
        """Run one task on this node's client with its state from the device's store; keep the new state there."""
        cid = self.s.client_id
        store = self.state_store(lane)
        w = self.worker(lane, spec)
        task = Task(kind, cid, rnd, message, store.get(cid))
        with torch_threads(task_threads(self.s.threads)):
            out = w.run(task)
        if isinstance(out, Update):
            from ..core.faults import first_nonfinite

            if out.state is not None and first_nonfinite(out.state) is None and first_nonfinite(out.upload) is None:
                store.put(cid, out.state)
                out.state = None  # the state stays on the device
            elif out.state is not None:  # not kept: the server's screening sees the same non-finite tensor
                bad = first_nonfinite(out.state)
                out.state = {bad[0]: out.state[bad[0]]} if bad is not None else None
        elif kind == "finetune" and isinstance(out, dict):
            store.put(cid, out)
            out = {}
        return out


def handle_tasks(msg: Any, context: Any, cache: dict[str, Any] | None = None) -> Any:
    """The ClientApp's work on one wave message: run every task it carries, answer with every result."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    settings = NodeSettings.from_node_config(dict(context.node_config))
    cache = cache if cache is not None else {}
    key = (context.run_id, json.dumps(settings.node_config(), sort_keys=True))
    rt = cache.get(key)
    if rt is None:
        rt = cache[key] = NodeRuntime(settings, context.run_id)
    tasks = json.loads(msg.content.config_records[TASKS]["tasks"])
    lanes = json.loads(msg.content.config_records[LANES]["lanes"])
    out = RecordDict()
    status: list[dict[str, Any]] = []
    for i, t in enumerate(tasks):
        layout = t["layout"]
        message = records_to_tensors(msg.content.array_records[f"m{i}"], layout) if layout else {}
        try:
            res = rt.run(int(t["lane"]), lanes[str(t["lane"])], t["kind"], int(t["round"]), message)
        except Exception as e:  # an evaluation or fine-tuning that raises: reported, the server raises it
            status.append({"type": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
            continue
        if isinstance(res, ClientFailure):
            status.append({"type": "failure", "kind": res.kind, "error": res.error, "traceback": res.traceback})
        elif isinstance(res, Update):
            rec, lay = tensors_to_records(res.upload)
            out[f"u{i}"] = rec
            st_rec, st_lay = tensors_to_records(res.state) if res.state else (None, {})
            if st_rec is not None:
                out[f"s{i}"] = st_rec
            out[f"x{i}"] = MetricRecord({k: float(v) for k, v in res.metrics.items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
            status.append({"type": "update", "layout": lay, "state_layout": st_lay, "weight": float(res.weight),
                           "metric_types": {k: type(v).__name__ for k, v in res.metrics.items()}})
        elif isinstance(res, EvalResult):
            from flwr.app import Array, ArrayRecord

            views, confusions = {}, ArrayRecord()
            for view, c in res.counts.items():
                d, conf = counts_to_json(c)
                views[view] = d
                if conf is not None:
                    confusions[view] = Array(np.ascontiguousarray(conf))
            if len(confusions):
                out[f"c{i}"] = confusions
            status.append({"type": "eval", "views": views, "metrics": {k: float(v) for k, v in res.metrics.items()}})
        elif isinstance(res, dict):
            status.append({"type": "state"})
        else:
            status.append({"type": "error", "error": f"task kind '{t['kind']}' returned a {type(res).__name__}, which "
                                                     f"Flower mode does not carry yet", "traceback": None})
    out[TASKS] = ConfigRecord({"status": json.dumps(status)})
    release_memory()
    return out


# ----------------------------------------------------------------------------------- server side
def _message_type(kinds: set[str]) -> str:
    if kinds == {"train"}:
        return "train"
    if kinds == {"eval"}:
        return "evaluate"
    return "query.fedforge"


class FlowerHub:
    """Sends the tasks of every experiment that waits for its clients, one Flower message per node and wave, and hands
    each experiment its results. Server-side work runs under ``turn``: one experiment at a time."""

    def __init__(self, grid: Any, nodes: dict[int, int], lanes: dict[int, dict[str, Any]], *,
                 round_timeout: float | None = 600.0, poll: float = 0.1):
        self.grid = grid
        self.nodes = dict(nodes)  # client id → Flower node id
        self.lanes = lanes  # experiment → {"algorithm", "params", "ctx", ...}
        self.round_timeout = round_timeout
        self.poll = poll
        self.turn = threading.Lock()
        self._cond = threading.Condition()
        self._pending: dict[int, list[Task]] = {}
        self._results: dict[int, list[Any] | BaseException] = {}
        self._live: set[int] = set()
        self.missed: dict[int, list[dict[str, Any]]] = {}  # experiment → eval/finetune tasks that got no answer
        self.waves = 0

    # ------------------------------------------------------------------------ called by experiments
    def call(self, lane: int, tasks: list[Task]) -> list[Any]:
        """From an experiment's thread, which holds ``turn``: run ``tasks`` on the nodes; ``turn`` is given up
        while waiting and taken back before returning."""
        if not tasks:
            return []
        with self._cond:
            self._pending[lane] = tasks
            self._cond.notify_all()
        self.turn.release()
        try:
            with self._cond:
                while lane not in self._results:
                    self._cond.wait()
                out = self._results.pop(lane)
        finally:
            self.turn.acquire()
        if isinstance(out, BaseException):
            raise out
        return out

    # ------------------------------------------------------------------------------------ the loop
    def run(self, bodies: dict[int, Any]) -> dict[int, BaseException | None]:
        """Run each experiment's body (a callable) in its own thread, serving their waves until all have ended;
        returns each experiment's exception (None: it finished)."""
        errors: dict[int, BaseException | None] = {}

        def lane_main(lane: int, body: Any) -> None:
            try:
                with self.turn:
                    body()
                errors[lane] = None
            except BaseException as e:  # noqa: BLE001 - reported by the caller
                errors[lane] = e
            finally:
                with self._cond:
                    self._live.discard(lane)
                    self._cond.notify_all()

        self._live = set(bodies)
        threads = [threading.Thread(target=lane_main, args=(lane, body), name=f"fedforge-experiment-{lane}",
                                    daemon=True) for lane, body in bodies.items()]
        for t in threads:
            t.start()
        while True:
            with self._cond:
                while self._live and not all(lane in self._pending for lane in self._live):
                    self._cond.wait()
                if not self._live:
                    break
                batch, self._pending = self._pending, {}
            try:
                results: dict[int, list[Any] | BaseException] = self.wave(batch)
            except BaseException as e:  # noqa: BLE001 - every waiting experiment gets the error
                results = {lane: e for lane in batch}
            with self._cond:
                self._results.update(results)
                self._cond.notify_all()
        for t in threads:
            t.join()
        return errors

    def wave(self, batch: dict[int, list[Task]]) -> dict[int, list[Any] | BaseException]:
        """One message per node with every experiment's tasks for it; replies until all are in or the deadline."""
        from flwr.app import ConfigRecord, Message, RecordDict

        self.waves += 1
        per_node: dict[int, list[tuple[int, int, Task]]] = {}
        results: dict[int, list[Any]] = {lane: [None] * len(tasks) for lane, tasks in batch.items()}
        online = set(self.grid.get_node_ids())
        for lane, tasks in batch.items():
            for j, t in enumerate(tasks):
                node = self.nodes.get(t.cid)
                if node is None or node not in online:
                    results[lane][j] = self._missing(lane, t, "its SuperNode is not connected to the SuperLink")
                    continue
                per_node.setdefault(node, []).append((lane, j, t))
        messages, order = [], []
        ttl = (self.round_timeout or 43200.0) + 60.0
        for node, items in per_node.items():
            content = RecordDict()
            desc = []
            for i, (lane, _, t) in enumerate(items):
                rec, layout = tensors_to_records(t.message)
                if layout:
                    content[f"m{i}"] = rec
                desc.append({"lane": lane, "kind": t.kind, "round": t.round, "cid": t.cid, "layout": layout})
            content[TASKS] = ConfigRecord({"tasks": json.dumps(desc)})
            used = sorted({lane for lane, _, _ in items})
            content[LANES] = ConfigRecord({"lanes": json.dumps({str(lane): self.lanes[lane] for lane in used})})
            rnd = max(t.round for _, _, t in items)
            messages.append(Message(content, dst_node_id=node, message_type=_message_type({t.kind for _, _, t in items}),
                                    ttl=ttl, group_id=str(rnd)))
            order.append(node)
        ids = list(self.grid.push_messages(messages))
        by_id = dict(zip(ids, order))
        waiting = set(ids)
        deadline = None if self.round_timeout is None else time.monotonic() + self.round_timeout
        replies: dict[int, Any] = {}
        while waiting and (deadline is None or time.monotonic() < deadline):
            for r in self.grid.pull_messages(list(waiting)):
                mid = r.metadata.reply_to_message_id
                if mid in waiting:
                    waiting.discard(mid)
                    replies[by_id[mid]] = r
            if waiting:
                time.sleep(self.poll)
        for node, items in per_node.items():
            reply = replies.get(node)
            kind = "timeout"
            if reply is None:
                why = f"its SuperNode did not answer within --round-timeout {self.round_timeout:g} s"
            elif reply.has_error() and reply.error.code in UNANSWERED:
                why = f"its SuperNode went away before answering ({reply.error.reason})"
            elif reply.has_error():
                why, kind = f"its SuperNode answered with an error ({reply.error.reason})", "error"
            else:
                why = None
            if why is not None:
                for lane, j, t in items:
                    results[lane][j] = self._missing(lane, t, why, kind=kind)
                continue
            status = json.loads(reply.content.config_records[TASKS]["status"])
            for i, ((lane, j, t), st) in enumerate(zip(items, status)):
                results[lane][j] = self._result(reply.content, i, t, st)
        out: dict[int, list[Any] | BaseException] = {}
        for lane, res in results.items():
            err = next((r for r in res if isinstance(r, BaseException)), None)
            out[lane] = err if err is not None else res
        return out

    def _missing(self, lane: int, t: Task, why: str, kind: str = "timeout") -> Any:
        """What stands for a task that got no answer: a failed update (the round goes on without it), or an
        evaluation without counts (the record pools the clients that answered)."""
        text = f"client {t.cid}: {why}"
        if t.kind == "train":
            return ClientFailure(t.cid, t.round, kind, text)
        log.warning("round %d: client %d's %s task got no answer (%s); left out", t.round, t.cid, t.kind, why)
        self.missed.setdefault(lane, []).append({"round": t.round, "client": t.cid, "task": t.kind, "kind": kind,
                                                 "injected": False, "error": text})
        if t.kind == "eval":
            return EvalResult(t.cid, {})
        return {}

    @staticmethod
    def _result(content: Any, i: int, t: Task, st: dict[str, Any]) -> Any:
        typ = st["type"]
        if typ == "failure":
            return ClientFailure(t.cid, t.round, st["kind"], st["error"], False, st.get("traceback"))
        if typ == "error":
            if t.kind == "train":
                return ClientFailure(t.cid, t.round, "error", st["error"], False, st.get("traceback"))
            return RuntimeError(f"client {t.cid}'s {t.kind} task (round {t.round}) failed on its node:\n"
                                f"{st.get('traceback') or st['error']}")
        if typ == "update":
            upload = records_to_tensors(content.array_records[f"u{i}"], st["layout"])
            state = records_to_tensors(content.array_records[f"s{i}"], st["state_layout"]) if st["state_layout"] else None
            raw = dict(content.metric_records[f"x{i}"]) if f"x{i}" in content.metric_records else {}
            types = st.get("metric_types", {})
            metrics = {k: int(v) if types.get(k) == "int" else float(v) for k, v in raw.items()}
            return Update(upload, state, st["weight"], metrics, t.cid)
        if typ == "eval":
            counts = {}
            confusions = content.array_records[f"c{i}"] if f"c{i}" in content.array_records else {}
            for view, d in st["views"].items():
                conf = confusions[view].numpy() if view in confusions else None
                counts[view] = counts_from_json(d, conf)
            return EvalResult(t.cid, counts, st.get("metrics", {}))
        if typ == "state":
            return {}
        raise RuntimeError(f"unknown result type '{typ}' from client {t.cid}")


@EXECUTORS.register("flower", summary="client tasks on Flower SuperNodes (inside `fedforge deploy server`); extra "
                                      "fedforge[flower]")
class FlowerExecutor(Executor):
    """One experiment's view of a :class:`FlowerHub`: ``map``/``imap`` hand the tasks to the hub, which sends them to
    the SuperNodes that own the clients and returns their results in task order. Client states stay on the devices
    (the server's state store stays empty)."""

    name = "flower"

    def __init__(self, workers: int = 0, threads: int = 0, hub: FlowerHub | None = None, lane: int = 0,
                 **options: Any):
        super().__init__(workers, threads, **options)
        self.hub = hub
        self.lane = lane

    def start(self, spec: WorkerSpec) -> None:
        if self.hub is None:
            raise ConfigError("the flower executor sends client tasks to Flower SuperNodes and runs only inside a "
                              "Flower ServerApp; start the run with `fedforge deploy server` (see docs/deploy.md).")

    def map(self, tasks: Iterable[Task]) -> list[Any]:
        assert self.hub is not None
        return self.hub.call(self.lane, list(tasks))

    def imap(self, tasks: Iterable[Task]) -> Iterator[Any]:
        return iter(self.map(tasks))


# ------------------------------------------------------------------------------------ the ServerApp
def wait_for_nodes(grid: Any, n: int, timeout: float) -> list[int]:
    t0 = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() - t0 > timeout:
            raise ConfigError(f"only {len(nodes)} of the {n} SuperNodes asked for (--min-nodes) connected within "
                              f"{timeout:g} s; start more with `fedforge deploy client`, or lower --min-nodes.")
        time.sleep(0.5)


def describe_nodes(grid: Any, nodes: list[int], timeout: float) -> dict[int, dict[str, Any]]:
    """Ask every node what it holds: client id → its description (with its Flower node id)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    msgs = [Message(RecordDict({"fedforge": ConfigRecord({"ask": "describe"})}), dst_node_id=n, message_type=DESCRIBE,
                    ttl=timeout + 60.0) for n in nodes]
    ids = list(grid.push_messages(msgs))
    node_of = dict(zip(ids, nodes))
    waiting, replies = set(ids), {}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for r in grid.pull_messages(list(waiting)):
            if r.metadata.reply_to_message_id in waiting:
                waiting.discard(r.metadata.reply_to_message_id)
                replies[node_of[r.metadata.reply_to_message_id]] = r
        if waiting:
            time.sleep(0.1)
    out: dict[int, dict[str, Any]] = {}
    for node in nodes:
        r = replies.get(node)
        if r is None:
            log.warning("SuperNode %d did not describe itself within %g s; left out of the federation", node, timeout)
            continue
        if r.has_error():
            log.warning("SuperNode %d could not describe itself (%s); left out of the federation", node, r.error.reason)
            continue
        d = json.loads(r.content.config_records["fedforge"]["node"])
        if "error" in d:
            log.warning("SuperNode %d: %s; left out of the federation", node, d["error"])
            continue
        d["node_id"] = node
        if d["cid"] in out:
            raise ConfigError(f"two SuperNodes (ids {out[d['cid']]['node_id']} and {node}) both hold client-id "
                              f"{d['cid']}; give every node its own --client-id.")
        out[d["cid"]] = d
    return out


def federation_from(descs: dict[int, dict[str, Any]], min_nodes: int) -> tuple[Any, list[str]]:
    """A server-side stand-in for the pooled dataset (no samples: labels rebuilt from the nodes' class counts, zero
    pixels that take no memory) with the nodes' own split, and each client's architecture."""
    from ..data import Dataset

    if len(descs) < min_nodes:
        raise ConfigError(f"only {len(descs)} SuperNodes described themselves, fewer than --min-nodes {min_nodes}.")
    cids = sorted(descs)
    if cids != list(range(len(cids))):
        raise ConfigError(f"the nodes hold client ids {cids}; a federation of {len(cids)} clients needs ids "
                          f"0..{len(cids) - 1} (fix --client-id).")
    first = descs[0]
    for c in cids:
        for key in ("input_shape", "modality", "sample_shape"):
            if descs[c][key] != first[key]:
                raise ConfigError(f"client {c} has {key} {descs[c][key]}, client 0 has {first[key]}; every node's "
                                  f"data must have the same {key.replace('_', ' ')}.")
    k = max(d["num_classes"] for d in descs.values())
    ys, split, pos = [], [], 0
    for c in cids:
        idx = []
        for part in ("train_counts", "test_counts"):
            counts = np.asarray(descs[c][part] + [0] * (k - len(descs[c][part])), np.int64)
            y = np.repeat(np.arange(k, dtype=np.int64), counts)
            ys.append(y)
            idx.append(np.arange(pos, pos + len(y), dtype=np.int64))
            pos += len(y)
        split.append((idx[0], idx[1]))
    y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
    x = np.broadcast_to(np.zeros((), dtype=np.dtype(first["dtype"])), (len(y), *first["sample_shape"]))
    names = list(dict.fromkeys(descs[c]["dataset"] for c in cids))
    name = "flower:" + (names[0] if len(names) == 1 else f"{len(names)} datasets")
    ds = Dataset(name, x, y, k, (), (), client_split=split, modality=first["modality"],
                 vocab_size=max((d.get("vocab_size") or 0) for d in descs.values()) or None)
    return ds, [descs[c]["arch"] for c in cids]


def serve(grid: Any, context: Any) -> None:
    """The ServerApp's body: wait for the nodes, learn what they hold, then run every experiment of the run config
    in lock-step through the round engine, each writing its own run directory."""
    from ..config import build_config
    from ..core.simulation import Simulation

    if not log.handlers:  # the ServerApp's process: fedforge's progress goes to the run's log (`flwr log`)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fedforge: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    spec = json.loads(str(context.run_config["fedforge"]))
    min_nodes = int(spec["min_nodes"])
    nodes = wait_for_nodes(grid, min_nodes, float(spec.get("node_timeout", 300)))
    descs = describe_nodes(grid, nodes, float(spec.get("node_timeout", 300)))
    shadow, archs = federation_from(descs, min_nodes)
    log.info("federation: %d clients on %d SuperNodes (%s)", len(archs), len(descs),
             ", ".join(f"client {c}: {a}" for c, a in enumerate(archs)))
    lanes, bodies, sims = {}, {}, {}
    hub = FlowerHub(grid, {c: d["node_id"] for c, d in descs.items()}, lanes,
                    round_timeout=spec.get("round_timeout"), poll=float(spec.get("poll", 0.1)))
    for lane, exp in enumerate(spec["experiments"]):
        cfg = build_config(exp)
        cfg.model = ",".join(archs)
        cfg.model_assignment = None
        cfg.dataset = shadow.name
        cfg.clients = len(archs)
        sim = Simulation(cfg, run_dir=cfg.out, progress=False, dataset=shadow, executor=FlowerExecutor(hub=hub, lane=lane))
        lanes[lane] = {"algorithm": cfg.algorithm, "params": cfg.params,
                       "ctx": json.loads(json.dumps(dataclasses.asdict(sim.ctx))),
                       "augment": cfg.augment, "deterministic": cfg.deterministic}
        sims[lane] = sim
        bodies[lane] = sim.run
        log.info("experiment %d: %s → %s", lane, sim.describe(), cfg.out)
    errors = hub.run(bodies)
    for lane, sim in sims.items():
        missed = hub.missed.get(lane)
        if missed and sim.run_dir is not None:
            from ..core.simulation import FAILURES_FILE
            from ..results.rundir import dumps

            with open(sim.run_dir.file(FAILURES_FILE), "a") as f:
                for m in missed:
                    f.write(dumps(m, indent=None) + "\n")
    failed = {lane: e for lane, e in errors.items() if e is not None}
    log.info("%d experiment(s) done in %d waves, %d failed", len(sims), hub.waves, len(failed))
    if failed:
        text = "; ".join(f"experiment {lane} ({sims[lane].cfg.algorithm}): {type(e).__name__}: {e}"
                         for lane, e in failed.items())
        raise RuntimeError(f"{len(failed)} of {len(sims)} experiment(s) failed: {text}")


def answer_describe(msg: Any, context: Any) -> Any:
    from flwr.app import ConfigRecord, Message, RecordDict

    try:
        s = NodeSettings.from_node_config(dict(context.node_config))
        d = describe(s, load_node_data(s))
    except Exception as e:  # noqa: BLE001 - the server logs it and leaves the node out
        d = {"error": f"{type(e).__name__}: {e}"}
    return Message(RecordDict({"fedforge": ConfigRecord({"node": json.dumps(d)})}), reply_to=msg)
