"""Protocol-buffer wire encoding helpers shared by the few places that write protobuf bytes by hand
(TensorBoard event records, tf.Example records, the ODPS tunnel's record format), so none of them
needs the protobuf runtime on its hot path."""

from __future__ import annotations

__all__ = ["varint"]


def varint(n: int) -> bytes:
    """Base-128 varint of ``n``; a negative int64 is ten bytes of two's complement, as protobuf does."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
