"""A real SavedModel survives the repository: TensorFlow loads the published version directory
(with the repository's metadata file inside it) and a downloaded copy, and gets the same answers.
Runs TensorFlow in a child process so the test process never imports it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    from kubeai_train.repository import ModelRepository

    export, root, dl = sys.argv[1:4]

    class Ctr(tf.Module):
        def __init__(self):
            self.w = tf.Variable([[0.5], [-0.25]])

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def __call__(self, x):
            return {"p": tf.sigmoid(tf.matmul(x, self.w))}

    model = Ctr()
    tf.saved_model.save(model, export, signatures={"serving_default": model.__call__})
    x = tf.constant([[1.0, 2.0], [3.0, -1.0]])
    want = model(x)["p"].numpy().tolist()

    repo = ModelRepository(root)
    mv = repo.publish("ctr", export, metadata={"framework": "tensorflow",
                                               "signature": {"inputs": {"x": "float32[?,2]"}}})
    repo.download("ctr", mv.version, dl)
    got = []
    for path in (mv.uri, dl):
        loaded = tf.saved_model.load(path)
        got.append(loaded.signatures["serving_default"](x=x)["p"].numpy().tolist())
    print(json.dumps({"want": want, "got": got, "uri": mv.uri, "framework": mv.metadata["framework"],
                      "files": sorted(f.path for f in mv.manifest)}))
    """
)


def test_tensorflow_loads_a_published_savedmodel(tmp_path):
    repo_dir = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(tmp_path / "export"),
            str(tmp_path / "repo"),
            str(tmp_path / "dl"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo_dir,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["got"][0] == doc["want"] and doc["got"][1] == doc["want"]
    assert doc["uri"] == str(tmp_path / "repo" / "ctr" / "1")
    assert doc["framework"] == "tensorflow"
    assert "saved_model.pb" in doc["files"] and any(f.startswith("variables/") for f in doc["files"])
