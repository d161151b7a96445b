"""Repository configuration: names, URL redaction, storage options and their precedence."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubeai_train.repository.config import (
    RepositoryConfig,
    check_alias,
    check_model_name,
    check_service,
    describe_options,
    redact_url,
    resolve_storage_options,
)
from kubeai_train.repository.errors import InvalidNameError, RepositoryConfigError


def test_names():
    assert check_model_name("ctr-v2.1_x") == "ctr-v2.1_x"
    assert check_alias("production") == "production"
    assert check_service("rec-svc/canary") == "rec-svc/canary"
    for bad in ("", "a/b", "..", ".x", "a\n", "ä"):
        with pytest.raises(InvalidNameError):
            check_model_name(bad)
    with pytest.raises(InvalidNameError, match="all digits"):
        check_alias("12")
    for bad in ("", "a b", "../x", "x\n"):
        with pytest.raises(InvalidNameError):
            check_service(bad)


def test_redact_url():
    assert redact_url("oss://AK:SK@bucket/models") == "oss://bucket/models"
    assert redact_url("https://u:p@host:8443/x?sig=abc") == "https://host:8443/x"
    assert redact_url("/plain/path") == "/plain/path"
    assert redact_url("memory://x/y") == "memory://x/y"


def test_oss_options_come_from_env_and_explicit_ones_win():
    env = {
        "OSS_ENDPOINT": "http://127.0.0.1:1",
        "OSS_ACCESS_KEY_ID": "ak-env",
        "OSS_ACCESS_KEY_SECRET": "sk-env",
    }
    opts = resolve_storage_options("oss", {"key": "ak-explicit"}, env)
    assert opts == {"endpoint": "http://127.0.0.1:1", "key": "ak-explicit", "secret": "sk-env"}
    assert resolve_storage_options("s3", {}, env) == {}
    assert resolve_storage_options("oss", None, {}) == {}


def test_describe_options_hides_secrets():
    text = describe_options({"endpoint": "http://e", "key": "AKID", "secret": "SK", "token": "T"})
    assert "AKID" not in text and "SK" not in text and "'T'" not in text
    assert "endpoint='http://e'" in text and "secret=<set>" in text


def test_config_validation():
    assert RepositoryConfig("/r").commit == "auto"
    for kwargs, match in [
        ({"root": " "}, "non-empty"),
        ({"root": "/r", "commit": "x"}, "commit must be one of"),
        ({"root": "/r", "grace_seconds": -1}, "grace_seconds"),
        ({"root": "/r", "serve_latest": -1}, "serve_latest"),
    ]:
        with pytest.raises(RepositoryConfigError, match=match):
            RepositoryConfig(**kwargs)


@given(st.text(max_size=140))
def test_any_accepted_name_is_one_safe_path_component(text):
    try:
        name = check_model_name(text)
    except InvalidNameError as e:
        assert "\n" not in str(e)
        return
    assert name == text and name not in (".", "..") and "/" not in name and "\\" not in name
    assert ".." not in name and not name.startswith((".", "-")) and name.isascii() and name.isprintable()
    assert len(name) <= 128
