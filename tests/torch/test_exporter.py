from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from kubeai_train.torch.exporter import ServingModule, export, load
from kubeai_train.torch.features import CTRFeatures
from kubeai_train.torch.model import DLRM
from kubeai_train.torch.types import ExportError

from ._helpers import ctr_columns


def test_export_round_trip_in_fresh_process(tmp_path):
    torch.manual_seed(0)
    f = CTRFeatures(buckets=50)
    m = DLRM(f.sizes, len(f.dense), dim=4)
    batch = f.transform(ctr_columns(32))
    ids, dense = torch.from_numpy(batch["ids"]), torch.from_numpy(batch["dense"])
    out = export(m, f, tmp_path / "export", sample=(ids, dense))
    assert sorted(p.name for p in out.iterdir()) == [
        "features.json",
        "model.pt",
        "signature.json",
        "state_dict.pt",
    ]
    assert CTRFeatures.from_dict(json.loads((out / "features.json").read_text())) == f
    with torch.no_grad():
        live = ServingModule(m).eval()(ids, dense)
    assert torch.equal(load(out)(ids, dense), live)

    np.savez(tmp_path / "in.npz", ids=batch["ids"], dense=batch["dense"], live=live.numpy())
    code = textwrap.dedent(
        f"""
        import sys, numpy as np, torch
        d = np.load({str(tmp_path / "in.npz")!r})
        with torch.no_grad():
            p = torch.jit.load({str(out / "model.pt")!r})(torch.from_numpy(d["ids"]), torch.from_numpy(d["dense"]))
        assert not any(m.startswith("kubeai_train") for m in sys.modules), "training code was imported"
        print(bool((p.numpy() == d["live"]).all()))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "True", proc.stderr


def test_export_refuses_non_empty_dir(tmp_path):
    (tmp_path / "x").write_text("")
    f = CTRFeatures(buckets=5)
    with pytest.raises(ExportError, match="is not empty"):
        export(DLRM(f.sizes, len(f.dense), dim=2), f, tmp_path)
