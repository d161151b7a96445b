"""The row checks every predictor starts with: no framework, hand-made signatures and rows."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kubeai_train.serving import (
    ColumnTypeError,
    ExportFormatError,
    InputError,
    InputSpec,
    MissingColumnError,
    Signature,
    detect_format,
)
from kubeai_train.serving.rows import check_rows, slices

SIG = Signature(
    framework="torch",
    format="torchscript",
    inputs=(InputSpec("I1", "float32"), InputSpec("C1", "string"), InputSpec("C2", "string")),
)


def test_a_table_a_batch_and_a_dict_of_lists_give_the_same_columns():
    d = {"I1": [1.0, None, 3], "C1": ["a", None, "c"], "C2": np.array(["x", "y", "z"]), "label": [0, 1, 0]}
    table = pa.table({k: pa.array(v) for k, v in d.items()})
    for rows in (d, table, table.to_batches()[0], {k: table.column(k) for k in table.column_names}):
        cols, n = check_rows(rows, SIG)
        assert n == 3 and list(cols) == ["I1", "C1", "C2"]  # the label is not taken
        assert cols["I1"].to_pylist() == [1.0, None, 3.0]
        assert cols["C1"].to_pylist() == ["a", None, "c"] and cols["C2"].to_pylist() == ["x", "y", "z"]


def test_nan_is_null_and_all_null_columns_take_the_declared_type():
    cols, _ = check_rows({"I1": np.array([np.nan, 2.0]), "C1": [None, None], "C2": pa.nulls(2)}, SIG)
    assert cols["I1"].null_count == 1
    assert cols["C1"].type == pa.string() and cols["C2"].type == pa.string() and cols["C2"].null_count == 2


def test_dictionary_encoded_strings_are_kept_encoded_numbers_decoded():
    c1 = pa.array(["a", "b", "a"]).dictionary_encode()
    i1 = pa.array([1.5, 2.5, 1.5]).dictionary_encode()
    cols, _ = check_rows({"I1": i1, "C1": c1, "C2": ["x"] * 3}, SIG)
    assert pa.types.is_dictionary(cols["C1"].type) and cols["I1"].type == pa.float64()


def test_a_missing_column_is_named_with_its_type_in_one_line():
    with pytest.raises(MissingColumnError) as e:
        check_rows({"I1": [1.0], "C1": ["a"], "label": [1]}, SIG)
    msg = str(e.value)
    assert "\n" not in msg and "'C2' (string)" in msg and "'I1'" not in msg.split(";")[0]
    assert "rows have ['C1', 'I1', 'label']" in msg
    assert isinstance(e.value, InputError) and isinstance(e.value, ValueError)
    assert str(pickle.loads(pickle.dumps(e.value))) == msg  # errors cross processes


@pytest.mark.parametrize(
    ("column", "value", "words"),
    [
        ("C1", [1, 2], ["'C1'", "int64", "raw strings"]),
        ("I1", ["1", "2"], ["'I1'", "string", "numbers"]),
        ("I1", [True, False], ["'I1'", "bool"]),
        ("C1", "ab", ["'C1'", "1-d array", "str"]),
        ("C1", np.zeros((2, 2)), ["'C1'", "shape (2, 2)"]),
        ("C1", ["a", 1], ["'C1'", "one type per column"]),
    ],
)
def test_a_column_of_the_wrong_type_is_named_with_what_is_expected(column, value, words):
    rows = {"I1": [1.0, 2.0], "C1": ["a", "b"], "C2": ["x", "y"], column: value}
    with pytest.raises(ColumnTypeError) as e:
        check_rows(rows, SIG)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_columns_of_different_lengths_are_refused():
    with pytest.raises(InputError, match=r"column 'C1' has 1 rows, 'I1' has 2: give columns of one length"):
        check_rows({"I1": [1.0, 2.0], "C1": ["a"], "C2": ["x", "y"]}, SIG)


def test_rows_of_another_kind_are_refused():
    with pytest.raises(InputError, match=r"got list"):
        check_rows([{"I1": 1.0}], SIG)


def test_int_inputs_refuse_nulls():
    sig = Signature("tf", "saved_model", (InputSpec("n", "int64"),))
    assert check_rows({"n": [1, 2]}, sig)[0]["n"].to_pylist() == [1, 2]
    with pytest.raises(ColumnTypeError, match=r"'n' has 1 nulls; expected integers without nulls: fill them"):
        check_rows({"n": [1, None]}, sig)


def test_slices_cover_every_row_once():
    cols, n = check_rows({"I1": list(range(10)), "C1": ["a"] * 10, "C2": ["b"] * 10}, SIG)
    parts = list(slices(cols, n, 4))
    assert [len(p["I1"]) for p in parts] == [4, 4, 2]
    assert sum((p["I1"].to_pylist() for p in parts), []) == list(range(10))


def test_signatures_are_validated():
    with pytest.raises(ExportFormatError, match=r"input 'x' has dtype 'float16'"):
        InputSpec("x", "float16")
    with pytest.raises(ExportFormatError, match=r"\['a'\] appear twice"):
        Signature("tf", "saved_model", (InputSpec("a", "string"), InputSpec("a", "string")))
    assert SIG.to_json()["inputs"] == {"I1": "float32", "C1": "string", "C2": "string"}


def test_detect_format_by_files(tmp_path: Path):
    (tmp_path / "tf").mkdir()
    (tmp_path / "tf" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "pt").mkdir()
    for f in ("model.pt", "features.json"):
        (tmp_path / "pt" / f).write_text("{}")
    assert detect_format(tmp_path / "tf") == "saved_model" and detect_format(tmp_path / "pt") == "torchscript"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.pt").write_text("")
    with pytest.raises(ExportFormatError, match=r"neither a SavedModel .* it holds \['model.pt'\]"):
        detect_format(tmp_path / "other")


def test_importing_the_room_imports_no_framework():
    code = (
        "import json, sys\nimport kubeai_train.serving, kubeai_train.serving.rows\n"
        "print(json.dumps([m for m in ('torch', 'tensorflow') if m in sys.modules]))"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
