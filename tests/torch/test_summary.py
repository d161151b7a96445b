from __future__ import annotations

import json

from kubeai_train.torch.summary import ScalarWriter


def test_event_file_readable_by_tensorflow_and_jsonl(tmp_path):
    w = ScalarWriter(str(tmp_path))
    w.scalar("train/loss", 0.5, 10)
    w.scalar("eval/auc", 0.75, 20)
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["tag"], r["step"], r["value"]) for r in rows] == [
        ("train/loss", 10, 0.5),
        ("eval/auc", 20, 0.75),
    ]

    import tensorflow as tf  # reads TensorBoard event files; tensorboard itself may be absent

    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    seen = [
        (e.step, v.tag, v.simple_value)
        for e in tf.compat.v1.train.summary_iterator(str(event_file))
        for v in e.summary.value
    ]
    assert seen == [(10, "train/loss", 0.5), (20, "eval/auc", 0.75)]
