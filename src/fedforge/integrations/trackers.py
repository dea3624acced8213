"""Experiment trackers: a run's metrics, config and curves in TensorBoard, Weights & Biases or MLflow.

``--tracker tensorboard|wandb|mlflow`` (repeatable) sends every ``metrics.jsonl`` record, the config and
``curves.png`` of a run to each named tracker, through the library's own API, into ``<run_dir>/trackers/``:

* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` event files in ``trackers/tensorboard/``: one scalar per
  numeric field of each record, the config as text and as hparams, ``curves.png`` as an image.
* ``wandb``: an *offline* W&B run in ``trackers/wandb/offline-run-*``; never touches the network
  (upload it later with ``wandb sync``).
* ``mlflow``: an MLflow run in a file store at ``trackers/mlruns`` (or in the store named by ``$MLFLOW_TRACKING_URI``):
  params (the flattened config), metrics, and ``curves.png``, ``config.yaml``, ``summary.json`` as artifacts.

Steps: a record is logged at ``step = record["round"]``. A record of a later stage (``"stage": "finetune"``, the
evaluation after the fine-tuning that follows the last round) is logged as ``<stage>/<field>`` at step
``round + 1``, so it never overwrites round R's values.

Trackers are made by name through ``TRACKERS`` / ``open_trackers`` (:mod:`fedforge.core.tracking`; unknown names
get a suggestion). Each library is imported only by its tracker (extras ``fedforge[tensorboard]``,
``fedforge[wandb]``, ``fedforge[mlflow]``). ``start`` raises :class:`ConfigError` when a tracker cannot start
(nothing has run yet); ``log`` and ``finish`` never raise: a tracker failure is a warning, never a lost run.

A resumed run continues the tracker's run. Rounds that a killed session logged after its last checkpoint are redone
and logged again: TensorBoard purges the killed session's events from the first re-logged step on; MLflow skips the
(metric, step) pairs it already holds; W&B writes a new offline segment with the same run id (``wandb sync``
uploads it after the first), in which those rounds appear again with identical values. See docs/trackers.md.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import re
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from .._io import atomic_write_text
from ..core.tracking import TRACKERS, open_trackers  # the session's registry (it imports this module on first use)
from ..errors import ConfigError, FedforgeError

log = logging.getLogger("fedforge")

TRACKER_DIR = "trackers"  # <run_dir>/trackers/: everything the trackers write
STATUSES = ("complete", "failed", "interrupted")
DEFAULT_PROJECT = "fedforge"  # W&B project and MLflow experiment unless $WANDB_PROJECT / $MLFLOW_EXPERIMENT_NAME


# ------------------------------------------------------------------------------------------------ records
def record_step(record: dict) -> tuple[int, str]:
    """(step, tag prefix) of a metrics record: its round and no prefix, or, for a later stage such as the
    fine-tuning evaluation after the last round, ``round + 1`` and ``"<stage>/"``."""
    step = int(record["round"])
    stage = record.get("stage")
    if stage and stage != "train":
        return step + 1, f"{stage}/"
    return step, ""


def record_scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a record (``round`` is the step, not a metric; None, text, booleans, lists and
    dicts are skipped)."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if k in ("round", "stage") or isinstance(v, bool) or not isinstance(v, numbers.Real):
            continue
        v = float(v)
        if math.isfinite(v):
            out[str(k)] = v
    return out


def flatten_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"params": {"mu": 0.1}}`` → ``{"params.mu": 0.1}``; lists and tuples become JSON text; scalars, None
    and text stay as they are."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(list(v))
        elif v is None or isinstance(v, (str, bool, int, float)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def _text(v: Any) -> str:
    """A config value as text, written the way config.yaml / JSON write it (None → null, True → true)."""
    return v if isinstance(v, str) else json.dumps(v)


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


def _code_block(text: str) -> str:
    """Markdown code block (TensorBoard renders text summaries as Markdown)."""
    return "\n".join("    " + line for line in text.rstrip("\n").splitlines())


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for the body; restore the previous values after."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------------ base
class Tracker:
    """One experiment tracker of a run. ``start`` before the first round, ``log`` with every metrics record as it is
    written, ``finish`` once at the end (status: complete, failed or interrupted).

    Subclasses implement ``import_library`` (raising ImportError when the library is absent), ``_start``, ``_log`` and
    ``_finish``; this class turns errors in ``log``/``finish`` into warnings.
    """

    name: str = ""
    extra: str = ""  # the pip extra that installs the library: fedforge[<extra>]
    package: str = ""  # the library's own package, for the install hint

    def __init__(self) -> None:
        self.require()  # a missing library stops the run before it starts, with the install hint
        self.active = False
        self.run_dir: Path | None = None
        self.rounds = 0
        self.last_step: int | None = None

    # -------------------------------------------------------------------- contract
    @classmethod
    def import_library(cls) -> Any:
        raise NotImplementedError

    @classmethod
    def install_hint(cls) -> str:
        return (f"the {cls.name} tracker needs {cls.package}: pip install 'fedforge[{cls.extra}]' "
                f"(or pip install {cls.package}), or run without --tracker {cls.name}.")

    @classmethod
    def require(cls) -> Any:
        """The library, imported; ConfigError with an install hint when it is not installed."""
        try:
            return cls.import_library()
        except ImportError as e:
            raise ConfigError(cls.install_hint()) from e

    def start(self, config: dict, run_dir: Path, resumed: bool) -> None:
        """Open the tracker's run (or continue it, for a resumed run). Raises ConfigError when it cannot start."""
        if run_dir is None:
            raise ConfigError(f"the {self.name} tracker needs a run directory; do not combine --tracker with an "
                              f"in-memory run (run_dir=False).")
        self.require()
        self.run_dir = Path(run_dir)
        self.rounds = int(config.get("rounds") or 0)
        self.last_step = None
        try:
            (self.run_dir / TRACKER_DIR).mkdir(parents=True, exist_ok=True)
            self._start(dict(config), self.run_dir, bool(resumed))
        except FedforgeError:
            raise
        except Exception as e:
            raise ConfigError(f"the {self.name} tracker could not start ({type(e).__name__}: {e}); fix that, or run "
                              f"without --tracker {self.name}.") from e
        self.active = True

    def log(self, record: dict) -> None:
        """Log one metrics record (as written to metrics.jsonl). Never raises: a failure is a warning."""
        if not self.active:
            return
        try:
            step, prefix = record_step(record)
            scalars = {prefix + k: v for k, v in record_scalars(record).items()}
            self._log(step, scalars)
            self.last_step = step if self.last_step is None else max(self.last_step, step)
        except Exception as e:
            log.warning("%s tracker: could not log the record of round %s (%s: %s); the run goes on",
                        self.name, record.get("round"), type(e).__name__, e)

    def finish(self, summary: dict | None, run_dir: Path, status: str) -> None:
        """Log curves.png, the config file and the summary, and close the tracker's run with ``status``.
        Never raises: a failure is a warning."""
        if not self.active:
            return
        self.active = False
        try:
            self._finish(summary, Path(run_dir), status if status in STATUSES else "failed")
        except Exception as e:
            log.warning("%s tracker: could not finish (%s: %s); the run's own files are complete",
                        self.name, type(e).__name__, e)

    # -------------------------------------------------------------------- helpers
    @property
    def final_step(self) -> int:
        """The step of end-of-run items (curves, summary): the last step logged, else the last round."""
        return self.last_step if self.last_step is not None else self.rounds

    @property
    def dir(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / TRACKER_DIR

    def _start(self, config: dict, run_dir: Path, resumed: bool) -> None:
        raise NotImplementedError

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def _finish(self, summary: dict | None, run_dir: Path, status: str) -> None:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ TensorBoard
_TB_STATUS = {"complete": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "interrupted": "STATUS_UNKNOWN"}
_TB_METRICS = ("global_acc", "personalized_acc")  # the scalars the hparams dashboard shows beside the config


@TRACKERS.register("tensorboard", summary="TensorBoard event files in <run>/trackers/tensorboard; extra fedforge[tensorboard]")
class TensorBoardTracker(Tracker):
    """TensorBoard through ``torch.utils.tensorboard.SummaryWriter``: scalars at step = round, the config as text and
    hparams, ``curves.png`` as an image. Every record is flushed at once, so a killed run loses nothing logged.
    A resumed run opens a new event file whose first step purges what the killed session logged from there on."""

    name = "tensorboard"
    extra = "tensorboard"
    package = "tensorboard"

    @classmethod
    def import_library(cls):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        return SummaryWriter

    def _start(self, config: dict, run_dir: Path, resumed: bool) -> None:
        self.logdir = self.dir / "tensorboard"
        self.writer = None
        if not resumed:  # a resumed run's config is logged already; its writer opens at the first step it logs
            self._open(None)
            self._write_config(config)

    def _open(self, purge_step: int | None) -> None:
        SummaryWriter = self.import_library()
        self.writer = SummaryWriter(log_dir=str(self.logdir), purge_step=purge_step, flush_secs=30)

    def _write_config(self, config: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("config", _code_block(_yaml(config)), 0)
        flat = {k: v for k, v in flatten_config(config).items() if v is not None}
        for item in hparams(flat, {m: 0.0 for m in _TB_METRICS}):  # experiment, session start (no metric values)
            self.writer.file_writer.add_summary(item)
        self.writer.flush()

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:  # resumed: hide whatever the killed session logged from this step on
            self._open(step)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def _finish(self, summary: dict | None, run_dir: Path, status: str) -> None:
        if self.writer is None:
            self._open(None)
        try:
            step = self.final_step
            curves = run_dir / "curves.png"
            if curves.is_file():
                import numpy as np
                from PIL import Image

                with Image.open(curves) as im:
                    image = np.asarray(im.convert("RGB"))
                self.writer.add_image("curves", image, step, dataformats="HWC")
            if summary:
                self.writer.add_text("summary", _code_block(json.dumps(summary, indent=2, default=str)), step)
            self._write_session_end(status)
        finally:
            self.writer.close()

    def _write_session_end(self, status: str) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(_TB_STATUS[status]),
                                             end_time_secs=time.time())
        md = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_end_info=end))
        value = Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=md)
        self.writer.file_writer.add_summary(Summary(value=[value]))


# ------------------------------------------------------------------------------------------------ W&B
_WANDB_EXIT = {"complete": 0, "failed": 1, "interrupted": 255}  # 255: W&B's code for a run stopped by Ctrl-C
_WANDB_SETTINGS = dict(silent=True, quiet=True, console="off", x_disable_stats=True, x_disable_meta=True,
                       x_disable_machine_info=True, disable_git=True, disable_code=True, save_code=False)


@TRACKERS.register("wandb", summary="offline Weights & Biases run in <run>/trackers/wandb (wandb sync); extra fedforge[wandb]")
class WandbTracker(Tracker):
    """Weights & Biases, offline only: ``wandb.init(mode="offline", dir=<run>/trackers)``, ``run.log(numbers,
    step=round)``, ``curves.png`` as a ``wandb.Image``, ``run.finish()``. No console capture, no system metrics,
    no git or code snapshot. The run id is kept in ``trackers/wandb_run_id``; a resumed run writes a new offline
    segment with the same id. When this tracker started W&B's background service in this process, ``finish`` tears
    it down and puts back the ``sys.excepthook``/``sys.exit`` hooks and ``WANDB_*`` variables W&B installed."""

    name = "wandb"
    extra = "wandb"
    package = "wandb"

    @classmethod
    def import_library(cls):
        import wandb

        return wandb

    def _start(self, config: dict, run_dir: Path, resumed: bool) -> None:
        wandb = self.import_library()
        id_file = self.dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else ""
        if not run_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as W&B's
            atomic_write_text(id_file, run_id + "\n")
        # W&B's service is process-wide; tear it down at the end only when it is ours to tear down
        setup = getattr(getattr(wandb, "sdk", None), "wandb_setup", None)
        self._owns_service = "WANDB_SERVICE" not in os.environ and getattr(setup, "_singleton", None) is None
        self._saved_hooks = (sys.excepthook, sys.exit)
        self._saved_env = {k: v for k, v in os.environ.items() if k.startswith("WANDB_")}
        if resumed:
            _wait_for_a_new_second(self.dir / "wandb", run_id)
        fields = getattr(wandb.Settings, "model_fields", None)
        settings = wandb.Settings(**{k: v for k, v in _WANDB_SETTINGS.items() if fields is None or k in fields})
        try:
            self.wandb = wandb
            self.run = wandb.init(mode="offline", dir=str(self.dir), project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                                  name=run_dir.name, config=config, id=run_id,
                                  resume="allow" if resumed else None, reinit="create_new", settings=settings)
        except BaseException:
            self._release()
            raise

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        if scalars:
            self.run.log(scalars, step=step)

    def _finish(self, summary: dict | None, run_dir: Path, status: str) -> None:
        try:
            curves = run_dir / "curves.png"
            if curves.is_file():
                self.run.log({"curves": self.wandb.Image(str(curves), caption=run_dir.name)}, step=self.final_step)
            if summary:
                self.run.summary["fedforge"] = json.loads(json.dumps(summary, default=str))
        finally:
            try:
                self.run.finish(exit_code=_WANDB_EXIT[status])
            finally:
                self._release()

    def _release(self) -> None:
        """Undo W&B's process-wide side effects, when this tracker caused them."""
        if not getattr(self, "_owns_service", False):
            return
        try:
            self.import_library().teardown()
        except Exception as e:  # the offline files are written by then
            log.debug("wandb teardown: %s", e)
        hook, exit_ = self._saved_hooks
        if type(getattr(sys.excepthook, "__self__", None)).__name__ == "ExitHooks":
            sys.excepthook = hook
        if type(getattr(sys.exit, "__self__", None)).__name__ == "ExitHooks":
            sys.exit = exit_
        for k in [k for k in os.environ if k.startswith("WANDB_") and k not in self._saved_env]:
            del os.environ[k]
        for k, v in self._saved_env.items():
            os.environ[k] = v


def _wait_for_a_new_second(root: Path, run_id: str, limit: float = 3.0) -> None:
    """W&B names an offline run's folder by the second its ``init`` starts and the run id; a resumed segment started
    within the same second as the previous one would write into that segment's folder. Wait for the next second."""
    from datetime import datetime

    deadline = time.monotonic() + limit
    while (root / f"offline-run-{datetime.now():%Y%m%d_%H%M%S}-{run_id}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ MLflow
_MLFLOW_STATUS = {"complete": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
_MLFLOW_KEY = re.compile(r"[^A-Za-z0-9_\-. /:]")  # characters MLflow accepts in metric and param names


def _import_mlflow():
    """Import MLflow with its usage telemetry off unless the user chose otherwise (MLflow decides this at import
    time; a local file store has no reason to reach the network). An MLflow imported earlier stays as it is."""
    user_decided = "mlflow" in sys.modules or {"MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"} & set(os.environ)
    if not user_decided:
        with _env(MLFLOW_DISABLE_TELEMETRY="true"):
            import mlflow
    else:
        import mlflow
    from mlflow.tracking import MlflowClient  # noqa: F401  (part of what this tracker needs)

    return mlflow


def _is_local(uri: str) -> bool:
    """A file store: a file: URI or a plain path (not a database, server or Databricks URI)."""
    return uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks"))


@TRACKERS.register("mlflow", summary="MLflow run in <run>/trackers/mlruns or $MLFLOW_TRACKING_URI; extra fedforge[mlflow]")
class MLflowTracker(Tracker):
    """MLflow through ``MlflowClient`` calls on an explicit run id (no global "active run"): params = the flattened
    config (values cut to MLflow's length limit), metrics at step = round, ``curves.png``, ``config.yaml`` and
    ``summary.json`` as artifacts, the run terminated with FINISHED / FAILED / KILLED.

    Store: ``$MLFLOW_TRACKING_URI`` when set (a shared server or database, to compare runs in one UI), else a file
    store in ``<run>/trackers/mlruns``, which keeps the run directory self-contained. MLflow 3 keeps the file store
    in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``; this tracker sets that variable
    around its own calls only. The run id and store are kept in ``trackers/mlflow_run_id`` and
    ``trackers/mlflow_tracking_uri``; a resumed run continues that run and skips (metric, step) pairs it holds."""

    name = "mlflow"
    extra = "mlflow"
    package = "mlflow-skinny"

    @classmethod
    def import_library(cls):
        return _import_mlflow()

    @contextlib.contextmanager
    def _store(self) -> Iterator[Any]:
        """The client, with MLflow's file store allowed for the duration of the calls (unless the user decided)."""
        allow = _is_local(self.uri) and "MLFLOW_ALLOW_FILE_STORE" not in os.environ
        with _env(MLFLOW_ALLOW_FILE_STORE="true") if allow else contextlib.nullcontext():
            if self.client is None:
                from mlflow.tracking import MlflowClient

                self.client = MlflowClient(tracking_uri=self.uri)
            yield self.client

    def _start(self, config: dict, run_dir: Path, resumed: bool) -> None:
        self.import_library()
        from mlflow.exceptions import MlflowException

        id_file, uri_file = self.dir / "mlflow_run_id", self.dir / "mlflow_tracking_uri"
        saved_id = id_file.read_text().strip() if resumed and id_file.is_file() else ""
        saved_uri = uri_file.read_text().strip() if resumed and uri_file.is_file() else ""
        self.uri = saved_uri or os.environ.get("MLFLOW_TRACKING_URI") or (self.dir / "mlruns").resolve().as_uri()
        self.client = None
        self.logged: set[tuple[str, int]] = set()
        run = None
        with self._store() as client:
            if saved_id:
                try:
                    run = client.get_run(saved_id)
                except MlflowException as e:
                    log.warning("mlflow tracker: run %s is not in %s (%s); starting a new MLflow run", saved_id, self.uri, e)
                if run is not None and run.info.lifecycle_stage == "deleted":
                    log.warning("mlflow tracker: run %s was deleted from %s; starting a new MLflow run", saved_id, self.uri)
                    run = None
            if run is not None:
                if run.info.status != "RUNNING":
                    client.update_run(run.info.run_id, status="RUNNING")
                for key in run.data.metrics:  # what the earlier session logged: never logged twice
                    self.logged.update((key, m.step) for m in client.get_metric_history(run.info.run_id, key))
            else:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
                exp = client.get_experiment_by_name(name)
                exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
                tags = {"fedforge.run_dir": str(run_dir.resolve()), "mlflow.source.name": "fedforge"}
                tags.update({f"fedforge.{k}": str(config[k]) for k in ("algorithm", "dataset", "model") if config.get(k)})
                run = client.create_run(exp_id, run_name=run_dir.name, tags=tags)
                atomic_write_text(id_file, run.info.run_id + "\n")
                atomic_write_text(uri_file, self.uri + "\n")
            self.run_id = run.info.run_id
            self._log_params(client, config, dict(run.data.params))

    def _log_params(self, client, config: dict, existing: dict[str, str]) -> None:
        from mlflow.entities import Param

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
        except ImportError:  # older MLflow: its historical limits
            MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH = 500, 100
        params = []
        for k, v in flatten_config(config).items():
            key, text = _MLFLOW_KEY.sub("_", k)[:250], _text(v)
            if len(text) > MAX_PARAM_VAL_LENGTH:
                text = text[:MAX_PARAM_VAL_LENGTH - 3] + "..."
            if key in existing:  # params are immutable in MLflow; a resumed run may change only non-result fields
                if existing[key] != text:
                    log.info("mlflow tracker: %s is %r in this session (the MLflow run keeps %r)", key, text, existing[key])
                continue
            params.append(Param(key, text))
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for k, v in scalars.items():
            key = _MLFLOW_KEY.sub("_", k)
            if (key, step) not in self.logged:
                metrics.append(Metric(key, v, now, step))
        with self._store() as client:
            for i in range(0, len(metrics), 1000):
                client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        self.logged.update((m.key, step) for m in metrics)

    def _finish(self, summary: dict | None, run_dir: Path, status: str) -> None:
        with self._store() as client:
            try:
                for name in ("curves.png", "config.yaml"):
                    if (run_dir / name).is_file():
                        client.log_artifact(self.run_id, str(run_dir / name))
                if summary:
                    client.log_dict(self.run_id, json.loads(json.dumps(summary, default=str)), "summary.json")
            finally:
                client.set_terminated(self.run_id, status=_MLFLOW_STATUS[status])


__all__ = ["TRACKERS", "MLflowTracker", "TensorBoardTracker", "Tracker", "WandbTracker", "flatten_config",
           "open_trackers", "record_scalars", "record_step"]
