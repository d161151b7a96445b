from google.protobuf import wrappers_pb2
from hypothesis import given
from hypothesis import strategies as st

from kubeai_train._protowire import varint


@given(st.integers(min_value=-(2**63), max_value=2**64 - 1))
def test_varint_matches_protobuf(n):
    # field 1, wire type 0, then the varint; proto3 omits a zero value
    msg = wrappers_pb2.Int64Value(value=n) if n < 2**63 else wrappers_pb2.UInt64Value(value=n)
    assert msg.SerializeToString() == (b"\x08" + varint(n) if n else b"")
