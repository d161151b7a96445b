"""TF Serving models.config rendering: only committed versions, labels only for loaded ones."""

from __future__ import annotations

import re

from google.protobuf import text_format
from hypothesis import given
from hypothesis import strategies as st
from tensorflow_serving.config import model_server_config_pb2

from kubeai_train.repository.serving import render_model_config, served_versions


def test_render_lists_versions_and_labels():
    text = render_model_config("ctr", "oss://b/models/ctr", [3, 5], {"production": 3, "old": 1}, "tensorflow")
    assert 'name: "ctr"' in text and 'base_path: "oss://b/models/ctr"' in text
    assert 'model_platform: "tensorflow"' in text
    assert re.findall(r"versions: (\d+)", text) == ["3", "5"]
    assert re.findall(r'key: "(\w+)"\s+value: (\d+)', text) == [("production", "3")]  # 1 is not loaded
    assert text.count("{") == text.count("}")


def parse(text: str) -> model_server_config_pb2.ModelServerConfig:
    """Parse with TF Serving's own ModelServerConfig proto, as --model_config_file does."""
    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


def test_tf_serving_parses_the_config():
    cfg = parse(render_model_config("ctr", "oss://b/models/ctr", [3, 5], {"production": 3}, "tensorflow"))
    (model,) = cfg.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("ctr", "oss://b/models/ctr", "tensorflow")
    assert list(model.model_version_policy.specific.versions) == [3, 5]
    assert dict(model.version_labels) == {"production": 3}


def test_render_quotes_strings():
    text = render_model_config('we"ird', "/p/a\\b", [1])
    assert 'name: "we\\"ird"' in text and 'base_path: "/p/a\\\\b"' in text
    (model,) = parse(text).model_config_list.config
    assert (model.name, model.base_path) == ('we"ird', "/p/a\\b")


@given(
    committed=st.sets(st.integers(1, 50), max_size=12),
    aliases=st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), st.integers(1, 60), max_size=4),
    serve_latest=st.integers(0, 4),
)
def test_served_versions_are_committed_newest_plus_aliased(committed, aliases, serve_latest):
    served = served_versions(sorted(committed), aliases, serve_latest)
    assert served == sorted(set(served))
    assert set(served) <= committed
    assert set(sorted(committed)[-serve_latest:] if serve_latest else []) <= set(served)
    assert {v for v in aliases.values() if v in committed} <= set(served)
    text = render_model_config("m", "/b", served, aliases)
    assert [int(v) for v in re.findall(r"versions: (\d+)", text)] == served
    labelled = [int(v) for v in re.findall(r"value: (\d+)", text)]
    assert set(labelled) <= set(served)
    (model,) = parse(text).model_config_list.config
    assert list(model.model_version_policy.specific.versions) == served
    assert dict(model.version_labels) == {a: v for a, v in aliases.items() if v in served}
