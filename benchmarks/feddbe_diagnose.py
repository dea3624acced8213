"""Diagnostic run of FedDBE (a benchmark script, not a test): the registered feddbe plus extra evaluation views and a
log of the bias' size, for docs/benchmarks/feddbe-diagnosis.md.

Usage: DIAG_LOG=FILE.jsonl [EVERY=N] .venv/bin/python benchmarks/feddbe_diagnose.py KAPPA DATASET ROUNDS OUT_DIR

Views: global (received model), personalized (model + own bias), priorfix (received model with the
client's log train-label prior added to the logits: what a pure per-client logit offset could reach)."""
import json
import os
import sys

import torch

import fedforge
from fedforge import algorithms  # noqa
from fedforge.algorithms.feddbe import BIAS, GLOBAL_MEAN, FedDBE
from fedforge.core.algorithm import register_algorithm
from fedforge.core.messages import model_entries

LOG = os.environ.get("DIAG_LOG", "feddbe-diag.jsonl")

@register_algorithm("feddbe_diag", summary="diagnostic feddbe")
class FedDBEDiag(FedDBE):
    def eval_message(self, server, cid):
        msg = model_entries(server)
        if GLOBAL_MEAN in server:
            msg[GLOBAL_MEAN] = server[GLOBAL_MEAN]
        return msg

    def evaluate(self, rt, msg, state):
        out = super().evaluate(rt, msg, state)
        m = rt.model
        bias = state[BIAS].to(rt.device)
        logprior = torch.log(rt.class_counts().float() + 1.0)
        out["priorfix"] = rt.evaluate(lambda x: m(x) + logprior)
        with torch.no_grad():
            W = m.head.weight
            shift = W @ bias
            feats = torch.cat([m.features(x) for x, _ in rt.eval_batches()])
            fmean = feats.mean(0)
            rec = {"round": rt.round, "cid": rt.cid, "bias_norm": float(bias.norm()),
                   "logit_shift_range": float(shift.max() - shift.min()),
                   "logit_shift_std": float(shift.std()),
                   "corr_shift_logprior": float(torch.corrcoef(torch.stack([shift, logprior]))[0, 1]) if bias.abs().sum() > 0 else None,
                   "feat_mean_norm": float(fmean.norm()), "feat_rms": float(feats.pow(2).mean().sqrt()),
                   "head_w_norm": float(W.norm())}
            if GLOBAL_MEAN in msg:
                g = msg[GLOBAL_MEAN].to(rt.device)
                rec["gmean_norm"] = float(g.norm())
                rec["feat_mean_minus_gmean_norm"] = float((fmean - g).norm())
        with open(LOG, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return out

if __name__ == "__main__":
    kappa, ds, rounds, out = float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    res = fedforge.run(algorithm="feddbe_diag", dataset=ds, partition="dirichlet", alpha=0.1, clients=20, model="cnn",
                       rounds=rounds, lr=0.005, batch_size=10, local_epochs=1, eval_every=int(os.environ.get("EVERY", 2)),
                       seed=0, params={"kappa": kappa, "momentum": 1.0}, out=out, data_root=os.environ.get("FEDFORGE_DATA", "../shared/data"),
                       threads=1, progress=False)
    print(json.dumps(res.summary["best"]), json.dumps(res.summary["last"]))
