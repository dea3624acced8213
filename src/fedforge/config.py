"""Run configuration: one frozen-by-convention dataclass, loaded from defaults < YAML < command line < --set."""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, suggest
from .options import option as opt
from .options import validate_fields


@dataclass
class RunConfig:
    """Everything that defines a run. Field names are the YAML keys; ``--kebab-case`` are the CLI options."""

    algorithm: str = opt("fedavg", "algorithm name (see `fedforge list algorithms`)")
    dataset: str = opt("digits", "dataset: a name, npz:PATH, folder:PATH or pfllib:DIR")
    model: str = opt("cnn", "model or model group (see `fedforge list models`)")
    model_assignment: list[int] | None = opt(None, "architecture index of each client in the model group, e.g. 0,1,1,0 (default: client i gets i mod K)")
    partition: str = opt("dirichlet", "partitioner: iid, dirichlet, pathological, exdir, shards, or domains (feature "
                                      "shift, see --domains) (ignored for pfllib:)")
    alpha: float = opt(0.1, "Dirichlet concentration (dirichlet, exdir)", gt=0)
    classes_per_client: int = opt(2, "classes per client (pathological, exdir)", ge=1)
    shards_per_client: int = opt(2, "shards per client (shards)", ge=1)
    balance: bool = opt(True, "pathological: split each class equally among its holders")
    min_samples: int | None = opt(None, "minimum samples per client (default: PFLlib's rule, usually 40)", ge=1)
    train_ratio: float = opt(0.75, "share of each client's samples used for training", gt=0, lt=1)
    partition_file: str | None = opt(None, "reuse a saved partition (partition.npz or a run directory)")
    class_subset: str | None = opt(None, "keep classes A-B of the dataset, relabelled 0..B-A")
    clients: int = opt(10, "number of clients", ge=1)
    rounds: int = opt(50, "communication rounds", ge=0)
    join_ratio: float = opt(1.0, "share of clients sampled per round", gt=0, le=1)
    random_join: bool = opt(False, "draw the number of clients per round uniformly from [join_ratio·N, N]")
    drop_rate: float = opt(0.0, "probability that a sampled client drops out before reporting", ge=0, lt=1)
    batch_size: int = opt(10, "local mini-batch size", ge=1)
    local_epochs: int = opt(1, "local epochs per round", ge=1)
    lr: float = opt(0.005, "local learning rate", gt=0)
    optimizer: str = opt("sgd", "local optimiser: sgd (plain, as PFLlib and the papers), momentum or adam",
                         choices=("sgd", "momentum", "adam"))
    momentum: float = opt(0.9, "momentum of --optimizer momentum", ge=0, lt=1)
    weight_decay: float = opt(0.0, "L2 weight decay of the local optimiser", ge=0)
    lr_decay: float = opt(1.0, "the local learning rate of round r is lr·lr_decay^(r−1) (PFLlib's -ld/-ldg; 1: none)",
                          gt=0, le=1)
    server_opt: str | None = opt(None, "server optimiser on the global weights' change (Reddi et al. 2021): sgd, avgm "
                                 "(FedAvgM), adagrad, adam or yogi; any weight-sharing algorithm",
                                 choices=("sgd", "avgm", "adagrad", "adam", "yogi"))
    server_lr: float = opt(1.0, "server learning rate η of --server-opt", gt=0)
    server_momentum: float = opt(0.9, "β₁ of --server-opt (momentum of avgm, first moment of adagrad/adam/yogi)",
                                 ge=0, lt=1)
    server_beta2: float = opt(0.99, "β₂ of --server-opt adam/yogi", ge=0, lt=1)
    server_tau: float = opt(1e-3, "adaptivity τ of --server-opt adagrad/adam/yogi", gt=0)
    # differential privacy (docs/privacy.md)
    dp_epsilon: float | None = opt(None, "client-level DP-SGD in every client's local training: the ε each client may "
                                   "spend over the whole run (Opacus's RDP accountant; leave it out for no DP)", gt=0)
    dp_delta: float = opt(1e-5, "δ of the DP guarantees (--dp-epsilon and --server-dp-noise)", gt=0, lt=1)
    dp_max_grad_norm: float = opt(1.0, "DP-SGD: clip norm C of each sample's gradient", gt=0)
    dp_epochs: int | None = opt(None, "DP-SGD: passes over its data a client makes a round, to calibrate the noise "
                                "(default: --local-epochs; Ditto makes two, its global and personal models)", ge=1)
    server_dp_noise: float | None = opt(None, "user-level DP-FedAvg (McMahan et al. 2018): noise multiplier z on the "
                                        "average of the clipped client updates (leave it out for none)", ge=0)
    server_dp_clip: float = opt(1.0, "user-level DP: clip norm S of each client's model update (the initial S with "
                                "--server-dp-quantile)", gt=0)
    server_dp_quantile: float | None = opt(None, "user-level DP: adaptive clipping to this quantile of the update "
                                           "norms (Andrew et al. 2021)", gt=0, lt=1)
    eval_every: int = opt(1, "evaluate every N rounds (and after the last)", ge=1)
    eval_batch_size: int = opt(500, "batch size for evaluation", ge=1)
    seed: int = opt(0, "random seed (every round and client draws from its own stream derived from it)", ge=0)
    data_root: str | None = opt(None, "dataset cache folder (default: $FEDFORGE_DATA or ~/.cache/fedforge/data)")
    download: bool = opt(False, "allow downloading a missing dataset through torchvision")
    augment: bool = opt(False, "random crop (and flip for colour images) on training batches")
    executor: str = opt("sequential", "how local updates run: sequential, process, ray, vectorized")
    workers: int = opt(0, "workers for the process/ray executors (0: one per core)", ge=0)
    threads: int = opt(0, "torch threads per worker (0: automatic)", ge=0)
    gpu_memory: float | None = opt(None, "vectorized executor: device memory budget in GB that sizes its chunks of clients "
                                         "(default: --workers, else 100, clients at a time)", gt=0)
    ray_address: str | None = opt(None, "Ray cluster for the ray executor (default: $RAY_ADDRESS, else a local cluster)")
    devices: list[str] = opt([], "GPUs of the process/ray workers, e.g. cuda:0,cuda:1 (default: with --device cuda, worker i "
                            "uses GPU i mod the number visible); the server stays on --device")
    state_store: str = opt("auto", "where client states live: memory, disk (one checksummed file per client), or auto "
                                   "(memory until the clients' states are projected to pass 1 GB, then disk)",
                           choices=("memory", "disk", "auto"))
    state_dir: str | None = opt(None, "folder of the disk state store (default: <run dir>/client_states, or a temporary folder)")
    precision: str = opt("fp32", "fp32 or bf16 (autocast)", choices=("fp32", "bf16"))
    device: str = opt("cpu", "cpu or cuda[:N]")
    deterministic: bool = opt(False, "deterministic GPU kernels (torch.use_deterministic_algorithms, "
                                     "CUBLAS_WORKSPACE_CONFIG=:4096:8, cuDNN deterministic): exact resume on a GPU, "
                                     "at some speed (docs/reliability.md)")
    out: str | None = opt(None, "run directory (default: runs/<dataset>_<algorithm>_<time>)")
    tracker: list[str] = opt([], "experiment tracker: tensorboard, wandb or mlflow (repeatable)")
    params: dict[str, Any] = opt({}, "algorithm hyper-parameters (YAML mapping; --set key=value)", flag=False)
    # reliability (docs/reliability.md)
    checkpoint_every: int = opt(10, "write a resumable checkpoint every N rounds (0: only at the end); always at the end", ge=0)
    fail_rate: float = opt(0.0, "inject failures (exception, timeout, straggler) into this share of local updates", ge=0, le=1)
    max_fail_fraction: float = opt(0.5, "stop (with a checkpoint) when more than this share of a round's clients fail", ge=0, le=1)
    on_nan: str = opt("stop", "a NaN/Inf loss or upload: stop the run, or skip the offending client", choices=("stop", "skip"))
    # generator-assisted algorithms and few-shot clients (docs/generators.md, docs/fedktl.md)
    generator: str | None = opt(None, "image generator of generator-assisted algorithms: builtin[:DIR], diffusers:DIR or stylegan:FILE.pkl (default: builtin)")
    trust_generator_pickle: bool = opt(False, "allow loading a StyleGAN pickle (unpickling runs code from the file: only for files you trust)")
    shots: int = opt(5, "fewshot partitioner: training samples per class and client (the rest of those classes is test data)", ge=1)
    # feature shift and unseen clients (docs/scenarios.md)
    domains: str | None = opt(None, "the domains of --partition domains: rotate:0,90,180,270 | colour:original,invert,"
                              "gray,red | corrupt:gaussian_noise:3,blur:3,contrast:3,jpeg:3 | folder (a folder: dataset "
                              "laid out as ROOT/<domain>/<class>/<image>); kinds joined with ';'")
    clients_per_domain: int | None = opt(None, "--partition domains: clients per domain, K·D clients in all (default: "
                                         "--clients, dealt to the domains round-robin)", ge=1)
    domain_label_skew: str = opt("iid", "--partition domains: the partitioner that splits each domain's samples among "
                                 "its clients (iid; dirichlet, pathological, exdir, shards, fewshot with their options)")
    new_clients: int = opt(0, "keep the last N clients out of training: after the last round they fine-tune the global "
                           "model and are evaluated before and after (PFLlib's -nnc)", ge=0)
    fine_tune_epochs: int = opt(0, "local epochs the new clients fine-tune the global model for (PFLlib's -ften; 0: "
                                "evaluated as received)", ge=0)

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> RunConfig:
        if isinstance(self.model, (list, tuple)):  # a group written as a YAML list of registry names
            self.model = ",".join(str(m).strip() for m in self.model)
        validate_fields(self)
        if not (self.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", self.device)):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got '{self.device}'.")
        for d in self.devices:
            if not (d == "cpu" or re.fullmatch(r"cuda:\d+", str(d))):
                raise ConfigError(f"devices lists the workers' devices as cpu or cuda:N (e.g. cuda:0,cuda:1), got '{d}'.")
        if not isinstance(self.params, dict):
            raise ConfigError("params must be a mapping of algorithm hyper-parameters (key: value).")
        if self.model_assignment is not None:
            self.model_assignment = _index_list(self.model_assignment)
        if self.partition != "domains":
            given = [f"--{k.replace('_', '-')}" for k, default in DOMAIN_DEFAULTS if getattr(self, k) != default]
            if given:
                raise ConfigError(f"{given[0]} belongs to --partition domains (feature shift); add --partition domains, "
                                  f"or leave {given[0]} out.")
        _check_dp(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that determine results (not where they are written or how progress is shown)."""
        d = self.to_dict()
        for k in ("out", "data_root", "download", "workers", "threads", "checkpoint_every", "max_fail_fraction", "on_nan"):
            d.pop(k, None)
        for k in ("ray_address", "devices", "gpu_memory", "state_store", "state_dir", "tracker"):  # where work runs and results go, not results
            d.pop(k, None)
        if d.get("deterministic") is False:  # runs made before --deterministic resume as they were
            d.pop("deterministic")
        for k, default in DOMAIN_DEFAULTS + NEW_CLIENT_DEFAULTS + DP_DEFAULTS:  # runs made before these options resume as they were
            if d.get(k) == default:
                d.pop(k, None)
        return d

    @property
    def resolved_data_root(self) -> Path:
        from .data.sources import data_root

        return data_root(self.data_root)


_FIELD_NAMES = {f.name for f in fields(RunConfig)}
DOMAIN_DEFAULTS = (("domains", None), ("clients_per_domain", None), ("domain_label_skew", "iid"))
NEW_CLIENT_DEFAULTS = (("new_clients", 0), ("fine_tune_epochs", 0))
DP_DEFAULTS = (("dp_epsilon", None), ("dp_delta", 1e-5), ("dp_max_grad_norm", 1.0), ("dp_epochs", None),
               ("server_dp_noise", None), ("server_dp_clip", 1.0), ("server_dp_quantile", None))


def _check_dp(cfg: RunConfig) -> None:
    """DP options that belong to one that is off, and DP where it cannot act (docs/privacy.md)."""
    on = {"dp_epsilon": cfg.dp_epsilon is not None, "server_dp_noise": cfg.server_dp_noise is not None}
    owners = {"dp_max_grad_norm": ("dp_epsilon",), "dp_epochs": ("dp_epsilon",), "dp_delta": tuple(on),
              "server_dp_clip": ("server_dp_noise",), "server_dp_quantile": ("server_dp_noise",)}
    for k, default in DP_DEFAULTS:
        if k in owners and getattr(cfg, k) != default and not any(on[o] for o in owners[k]):
            flag, need = "--" + k.replace("_", "-"), " or ".join("--" + o.replace("_", "-") for o in owners[k])
            raise ConfigError(f"{flag} belongs to {need}; add {need}, or leave {flag} out.")
    if cfg.dp_epsilon is not None and cfg.executor == "vectorized":
        raise ConfigError("--dp-epsilon runs DP-SGD in the one training loop, which the vectorized executor does not "
                          "use; choose --executor sequential, process or ray.")


def _index_list(value: Any) -> list[int]:
    """A list of non-negative integers from a list or a text such as '0,1,1,0' or '[0, 1]'."""
    items = value
    if isinstance(value, str):
        text = value.strip().strip("[]")
        items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        if isinstance(items, (str, bytes)) or not items:
            raise ValueError
        out: list[int] = []
        for v in items:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            out.append(int(v))
        if min(out) < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"model_assignment must list one architecture index (0, 1, ...) per client, e.g. 0,1,1,0; "
                          f"got {value!r}.") from None
    return out


def parse_value(text: str) -> Any:
    """A command-line value as YAML would read it (numbers, booleans, lists), else the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'.")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise ConfigError(f"--set expects key=value, got '{item}'.")
        out[k] = parse_value(v.strip())
    return out


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]}).") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests too deeply to be a config; a config is a flat mapping of option: value.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, not a {type(data).__name__}.")
    return data


def build_config(base: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                 params: dict[str, Any] | None = None) -> RunConfig:
    """defaults < ``base`` (a YAML mapping) < ``overrides`` (explicit options) < ``params`` (``--set``)."""
    merged: dict[str, Any] = {}
    for source in (base or {}, overrides or {}):
        for k, v in source.items():
            key = str(k).replace("-", "_")
            if key not in _FIELD_NAMES:
                raise ConfigError(f"unknown config key '{k}'{suggest(key, _FIELD_NAMES)}; algorithm hyper-parameters go under 'params:' or --set.")
            if key == "params":
                if v is not None and not isinstance(v, dict):
                    raise ConfigError("params must be a mapping of algorithm hyper-parameters (key: value).")
                merged.setdefault("params", {}).update(v or {})
            else:
                merged[key] = v
    if params:
        merged.setdefault("params", {}).update(params)
    cfg = RunConfig(**merged)
    return cfg.validate()


def dump_yaml(cfg: RunConfig) -> str:
    text: str = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return text


# ------------------------------------------------------------------------------------- command line
def add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per RunConfig field (kebab-case), generated from its declaration (:mod:`fedforge.options`);
    absent options are not set, so YAML values survive."""
    from .options import add_arguments

    add_arguments(p.add_argument_group("run options (also YAML keys)"), RunConfig)
    p.add_argument("--config", help="YAML file of options (command-line options override it)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="algorithm hyper-parameter, repeatable (e.g. --set mu=0.01)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    from .options import values_from_args

    base = load_yaml(args.config) if getattr(args, "config", None) else {}
    return build_config(base, values_from_args(args, RunConfig), parse_assignments(getattr(args, "set", [])))
