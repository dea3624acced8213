"""`fedforge report`: a comparison table of several runs, as text and CSV."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from .rundir import load_run

COLUMNS = [
    ("run", "run"), ("algorithm", "algorithm"), ("dataset", "dataset"), ("model", "model"), ("rounds", "rounds"),
    ("best_global", "best global"), ("best_pers", "best pers."), ("last_global", "last global"), ("last_pers", "last pers."),
    ("mean5_global", "mean5 global"), ("mean5_pers", "mean5 pers."), ("s_per_round", "s/round"),
    ("up_per_round", "MB up/round"), ("down_per_round", "MB down/round"),
    ("params_up_per_round", "M params up/round"), ("params_down_per_round", "M params down/round"),
    ("up_per_client", "kB up/client"), ("down_per_client", "kB down/client"),
]


def _pct(v):
    return None if v is None else round(100.0 * v, 2)


def rows_for(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        cfg, s, metrics = load_run(p)
        r = max(1, s.get("rounds") or 1)
        rows.append({
            "run": Path(p).name, "algorithm": cfg.get("algorithm"), "dataset": cfg.get("dataset"), "model": cfg.get("model"),
            "rounds": s.get("rounds"),
            "best_global": _pct(s["best"].get("global_acc")), "best_pers": _pct(s["best"].get("personalized_acc")),
            "last_global": _pct(s["last"].get("global_acc")), "last_pers": _pct(s["last"].get("personalized_acc")),
            "mean5_global": _pct(s["mean_last5"].get("global_acc")), "mean5_pers": _pct(s["mean_last5"].get("personalized_acc")),
            "s_per_round": round(s.get("seconds_per_round") or 0.0, 2),
            "up_per_round": round((s.get("bytes_up_total") or 0) / r / 1e6, 4),
            "down_per_round": round((s.get("bytes_down_total") or 0) / r / 1e6, 4),
            **_communication(metrics, r),
        })
    return rows


def _communication(metrics: list[dict], rounds: int) -> dict:
    """Parameters per round (run totals / rounds) and kB per participating client (mean over the logged rounds)."""
    last = metrics[-1] if metrics else {}
    logged = [m for m in metrics if m.get("round", 0) >= 1 and m.get("stage", "train") == "train"]

    def mean(key: str):
        vals = [m[key] for m in logged if m.get(key) is not None]
        return round(sum(vals) / len(vals) / 1e3, 3) if vals else None

    return {"params_up_per_round": round((last.get("params_up_total") or 0) / rounds / 1e6, 4),
            "params_down_per_round": round((last.get("params_down_total") or 0) / rounds / 1e6, 4),
            "up_per_client": mean("bytes_up_per_client"), "down_per_client": mean("bytes_down_per_client")}


def format_text(rows: list[dict]) -> str:
    heads = [h for _, h in COLUMNS]
    table = [[("-" if row[k] is None else str(row[k])) for k, _ in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths)) for t in table]
    return "\n".join(lines)


def format_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[k for k, _ in COLUMNS])
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
