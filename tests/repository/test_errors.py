"""Repository errors: one base, built-in bases where they fit, and they pickle with attributes."""

from __future__ import annotations

import pickle

import pytest

from kubeai_train.repository import errors as E


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (E.InvalidNameError, ValueError),
        (E.InvalidArgumentError, ValueError),
        (E.InvalidMetadataError, ValueError),
        (E.RepositoryConfigError, ValueError),
        (E.SourceNotFoundError, FileNotFoundError),
        (E.ModelNotFoundError, LookupError),
        (E.VersionNotFoundError, LookupError),
        (E.AliasNotFoundError, LookupError),
        (E.IntegrityError, E.RepositoryError),
        (E.ConcurrentPublishError, E.RepositoryError),
    ],
)
def test_errors_subclass_and_pickle(cls, builtin):
    err = cls("model 'ctr' has no version 9; versions: 1, 2", name="ctr", version=9, path="a/b")
    assert isinstance(err, E.RepositoryError) and isinstance(err, builtin)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert str(back) == str(err) == "model 'ctr' has no version 9; versions: 1, 2"
    assert (back.name, back.version, back.path) == ("ctr", 9, "a/b")
