from google.protobuf.internal import encoder
from hypothesis import given
from hypothesis import strategies as st

from kubeai_train._protowire import varint


@given(st.integers(min_value=-(2**63), max_value=2**64 - 1))
def test_varint_matches_protobuf(n):
    expected = encoder._SignedVarintBytes(n) if n < 0 else encoder._VarintBytes(n)
    assert varint(n) == expected
