"""Plots of a run: accuracy and loss per round."""
from __future__ import annotations

import os
from pathlib import Path


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel(ax, series: dict[str, list], ylabel: str, log: bool = False, fontsize: float | None = None) -> None:
    """One panel of per-round curves, label → [(round, value), ...]."""
    for label, pts in series.items():
        ax.plot(*zip(*pts), marker=".", label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=fontsize)


def plot_curves(records: list[dict], path: str | os.PathLike, title: str = "",
                server_keys: list[str] | tuple[str, ...] = ()) -> Path:
    """Accuracy and loss per round; with ``server_keys`` (the algorithm's server-side metrics, e.g. FedTGP's
    prototype loss and margin, FedKTL's alignment losses) a third panel plots those per round."""
    plt = _mpl()
    records = [r for r in records if r.get("stage") != "new_clients"]  # the unseen clients' record is no curve

    def series(pairs, train_only: bool = False):
        out = {label: [(r["round"], r[key]) for r in records if r.get(key) is not None
                       and (not train_only or r.get("stage", "train") == "train")] for key, label in pairs}
        return {label: pts for label, pts in out.items() if pts}

    server = series([(k, k) for k in server_keys], train_only=True)
    fig, axes = plt.subplots(1, 3 if server else 2, figsize=(16 if server else 11, 4))

    views = [("global_acc", "global model (one model for all clients)"),
             ("personalized_acc", "personalized (each client's own model)")]
    extra = sorted({k for r in records for k in r if k.endswith("_acc") and k not in dict(views)
                    and not k.endswith("_ownclass_acc") and isinstance(r.get(k), (int, float))})
    views += [(k, f"{k[:-4]} view") for k in extra]  # further views an algorithm reports (e.g. head_acc)
    _panel(axes[0], series(views), "test accuracy (all clients' test data)")
    _panel(axes[1], series((("loss", "train loss"), ("global_loss", "test loss (global)"),
                            ("personalized_loss", "test loss (personalized)"))), "loss")
    if server:
        _panel(axes[2], server, "server-side metric", fontsize=8,
               log=all(v > 0 for pts in server.values() for _, v in pts))
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_comparison(runs: dict[str, list[dict]], path: str | os.PathLike, key: str = "auto", title: str = "") -> Path:
    """One curve per run (personalized accuracy where the run has it, else global)."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, recs in runs.items():
        k = key
        if k == "auto":
            k = "personalized_acc" if any(r.get("personalized_acc") is not None for r in recs) else "global_acc"
        pts = [(r["round"], r[k]) for r in recs if r.get(k) is not None and r.get("stage", "train") == "train"]
        if pts:
            ax.plot(*zip(*pts), label=f"{label} ({'pers.' if k == 'personalized_acc' else 'global'})")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


VIEWS = (("global_acc", "global model"), ("personalized_acc", "personalized"))


def group_curve(runs: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float | None]]:
    """(rounds, mean, sample std) of metric ``key`` over ``runs`` (each a metrics log), at the rounds where every run
    has a value (training stage only); the std is None for a single run."""
    import statistics

    per_run = [{r["round"]: r[key] for r in recs if r.get(key) is not None and r.get("stage", "train") == "train"}
               for recs in runs]
    rounds = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    mean = [statistics.fmean(d[t] for d in per_run) for t in rounds]
    std = [statistics.stdev(d[t] for d in per_run) if len(per_run) > 1 else None for t in rounds]
    return rounds, mean, std


def plot_groups(groups: dict[str, list[list[dict]]], path: str | os.PathLike, title: str = "") -> Path:
    """One curve per group of runs (label → the runs' metrics logs): the mean accuracy over the group's runs (its
    seeds) per round, with a ±1 sample-std band; one panel per view (global model, personalized) that any group has."""
    plt = _mpl()
    from matplotlib.ticker import MaxNLocator

    views = [(k, name) for k, name in VIEWS if any(group_curve(runs, k)[0] for runs in groups.values())]
    fig, axes = plt.subplots(1, max(1, len(views)), figsize=(7 * max(1, len(views)), 4.5), squeeze=False)
    for ax, (key, name) in zip(axes[0], views):
        for i, (label, runs) in enumerate(groups.items()):
            rounds, mean, std = group_curve(runs, key)
            if not rounds:
                continue
            pct = [100 * m for m in mean]
            line, = ax.plot(rounds, pct, marker=".", label=f"{label} (n={len(runs)})", color=f"C{i % 10}")
            if len(runs) > 1:
                ax.fill_between(rounds, [m - 100 * s for m, s in zip(pct, std)], [m + 100 * s for m, s in zip(pct, std)],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=1 if len(groups) < 8 else 2)
    if not views:
        axes[0][0].text(0.5, 0.5, "no accuracy recorded", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
