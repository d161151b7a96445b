"""The launcher's errors: one base, built-in bases where they fit, and they pickle."""

from __future__ import annotations

import pickle

from kubeai_train.launch.errors import JobFileError, LaunchError, ScriptNotFoundError, SpecError


def test_errors_pickle_and_subclass_builtins():
    for err in (SpecError("x"), JobFileError("y"), ScriptNotFoundError("z")):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err)
        assert isinstance(again, LaunchError)
    assert issubclass(SpecError, ValueError) and issubclass(ScriptNotFoundError, FileNotFoundError)
