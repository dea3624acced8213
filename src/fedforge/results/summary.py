"""Summaries of a metrics log: best, last, and mean of the last 5 evaluations, each labelled."""
from __future__ import annotations

import math
from typing import Any

ACC_KEYS = ("global_acc", "personalized_acc")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


NEW_CLIENTS = "new_clients"  # the stage of the unseen clients' record (fedforge.core.unseen)


def new_clients_summary(rec: dict) -> dict:
    """The unseen clients' accuracies beside the participants': before and after fine-tuning, the clients, and each
    client's and each domain's accuracy."""
    out = {"before": rec.get("before_acc"), "after": rec.get("after_acc"), "clients": rec.get("new_clients", []),
           "fine_tune_epochs": rec.get("fine_tune_epochs"), "before_loss": rec.get("before_loss"),
           "after_loss": rec.get("after_loss"),
           "per_client": {"before": rec.get("before_acc_clients"), "after": rec.get("after_acc_clients")}}
    domains = {k: v for k, v in rec.items() if "_acc_domain/" in k}
    if domains:
        out["domains"] = domains
    return out


def summarize(records: list[dict], *, rounds: int, wall_seconds: float, extra: dict | None = None, last_k: int = 5) -> dict:
    unseen = [r for r in records if r.get("stage") == NEW_CLIENTS]
    records = [r for r in records if r.get("stage") != NEW_CLIENTS]  # the participants' records
    train = [r for r in records if r.get("stage", "train") == "train"]
    best: dict[str, Any] = {}
    for k in ACC_KEYS:
        vals = [(r[k], r["round"]) for r in records if _finite(r.get(k))]
        if vals:
            v, rnd = max(vals, key=lambda t: (t[0], -t[1]))
            best[k] = v
            best[f"{k}_round"] = rnd
        else:
            best[k] = None
    last_rec = records[-1] if records else {}
    last = {"round": last_rec.get("round")}
    last |= {k: last_rec.get(k) for k in ACC_KEYS}
    if last_rec.get("stage"):
        last["stage"] = last_rec["stage"]
    tail = records[-last_k:]
    mean = {"rounds": [r["round"] for r in tail]}
    for k in ACC_KEYS:
        vals = [r[k] for r in tail if _finite(r.get(k))]
        mean[k] = sum(vals) / len(vals) if vals else None
    up = sum(r.get("bytes_up", 0) or 0 for r in train)
    down = sum(r.get("bytes_down", 0) or 0 for r in train)
    trained_rounds = max(1, rounds)
    out = {
        "best": best,
        "last": last,
        "mean_last5": mean,
        "rounds": rounds,
        "evaluations": len(records),
        "seconds_per_round": (last_rec.get("train_seconds", wall_seconds) / trained_rounds) if rounds else 0.0,
        "wall_seconds": wall_seconds,
        "bytes_up_total": last_rec.get("bytes_up_total", up),
        "bytes_down_total": last_rec.get("bytes_down_total", down),
    }
    if unseen:
        out[NEW_CLIENTS] = new_clients_summary(unseen[-1])
    if extra:
        out.update(extra)
    return out
