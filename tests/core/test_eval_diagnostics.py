"""Label-skew diagnostics of evaluation: predictions that name a class the client never trained on, and the accuracy
with those classes masked out (``*_offclass`` and ``*_ownclass_acc`` in metrics.jsonl)."""
from __future__ import annotations

import json

import torch

import fedforge
from fedforge.core.training import eval_loop


def test_eval_loop_counts_off_class_predictions_and_masked_accuracy():
    # 4 classes; the client holds classes 0 and 2 only
    absent = torch.tensor([False, True, False, True])
    logits = torch.tensor([
        [5.0, 1.0, 0.0, 0.0],  # predicts 0 (held), label 0: right either way
        [1.0, 5.0, 2.0, 0.0],  # predicts 1 (absent); masked → 2, label 2: wrong, right once masked
        [0.0, 1.0, 3.0, 9.0],  # predicts 3 (absent); masked → 2, label 0: wrong either way
        [0.0, 0.0, 1.0, 0.0],  # predicts 2 (held), label 2
    ])
    y = torch.tensor([0, 2, 0, 2])
    batches = [(logits[:2], y[:2]), (logits[2:], y[2:])]
    c = eval_loop(lambda x: x, batches, absent=absent)
    assert (c.correct, c.total) == (2, 4)
    assert (c.off_class, c.own_correct, c.own_total) == (2, 3, 4)
    plain = eval_loop(lambda x: x, batches)
    assert (plain.correct, plain.total, plain.own_total) == (2, 4, 0)  # not counted without a mask
    assert plain.loss_sum == c.loss_sum


def test_runs_report_off_class_rates_and_they_vanish_when_every_class_is_held(tmp_path):
    skew = fedforge.run(algorithm="fedavg", dataset="digits", partition="pathological", clients=5, rounds=1,
                        batch_size=20, lr=0.05, out=str(tmp_path / "skew"))
    rec = [json.loads(line) for line in (tmp_path / "skew" / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec == skew.records[-1]
    # pathological clients hold 2 of 10 classes: an untuned global model names absent classes often
    assert 0.0 < rec["global_offclass"] <= 1.0
    assert rec["global_ownclass_acc"] > rec["global_acc"]
    iid = fedforge.run(algorithm="local", dataset="digits", partition="iid", clients=2, rounds=1, batch_size=20,
                       lr=0.05, run_dir=False)
    last = iid.records[-1]
    assert last["personalized_offclass"] == 0.0
    assert last["personalized_ownclass_acc"] == last["personalized_acc"]
