"""The parts of a JobSpec: secret references and volumes from their shorthands."""

from __future__ import annotations

import pytest

from kubeai_train.launch.errors import SpecError
from kubeai_train.launch.parts import SecretRef, Volume


def test_parts_parse():
    assert SecretRef.parse("cred/key", "X") == SecretRef("cred", "key")
    assert Volume.parse("data:/data:ro") == Volume("data", "/data", "data", True)
    with pytest.raises(SpecError, match="absolute path"):
        Volume.parse("data:rel")
