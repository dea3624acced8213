"""Time FedRep's head epochs with and without the frozen-body feature cache (``mechanics.frozen_feature_batches``).

One client of a scenario trains its head for ``--head-epochs`` epochs with the body frozen, once through the body
batch by batch (the path without the cache) and once on features computed once; the script prints both times,
their ratio and the largest difference between the two resulting heads. Not a test; numbers depend on the load.

    scripts/cpu-slot .venv/bin/python benchmarks/head_cache.py --dataset fmnist --data-root ../shared/data
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--model", default="cnn")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--client", type=int, default=0)
    p.add_argument("--head-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import fedforge.algorithms  # noqa: F401
    from fedforge.algorithms.mechanics import frozen_feature_batches, head_loss, head_only_loss, is_head, named_params
    from fedforge.config import build_config
    from fedforge.core.runtime import ClientRuntime, Worker, WorkerSpec
    from fedforge.core.simulation import Simulation

    cfg = build_config(overrides=dict(algorithm="fedrep", dataset=args.dataset, data_root=args.data_root, model=args.model,
                                      partition="dirichlet", alpha=0.1, clients=args.clients, batch_size=args.batch_size,
                                      lr=0.005, seed=0, rounds=1, out=""), params={"head_epochs": args.head_epochs})
    sim = Simulation(cfg, run_dir=False, progress=False)
    worker = Worker(WorkerSpec(sim.ds, sim.partition, sim.algo))
    times: dict[str, list[float]] = {"through the body": [], "cached features": []}
    heads = {}
    for _ in range(args.repeats):
        for name in times:
            rt = ClientRuntime(worker, args.client, 1, 123)
            rt.load(rt.initial_params())
            params = named_params(rt.model, is_head)
            t0 = time.perf_counter()
            if name == "cached features":
                rt.train(loss_fn=head_loss, params=params, batches=frozen_feature_batches(rt, epochs=args.head_epochs))
            else:
                rt.train(loss_fn=head_only_loss, params=params, epochs=args.head_epochs)
            times[name].append(time.perf_counter() - t0)
            heads[name] = {k: v.clone() for k, v in rt.model.state_dict().items() if k.startswith("head.")}
    a, b = (min(v) for v in times.values())
    diff = max(float((heads["through the body"][k] - heads["cached features"][k]).abs().max()) for k in heads["cached features"])
    print(f"{args.dataset}/{args.model}, client {args.client} ({sim.ctx.train_sizes[args.client]} training samples), "
          f"{args.head_epochs} head epochs, batch {args.batch_size}, {torch.get_num_threads()} thread(s), best of {args.repeats}:")
    print(f"  through the body: {a:.2f} s   cached features: {b:.2f} s   ratio {a / b:.1f}x   max |head difference| {diff:.2e}")


if __name__ == "__main__":
    main()
