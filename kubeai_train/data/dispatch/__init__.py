"""Dynamic split dispatch: a dispatcher hands the next piece of an epoch to whichever reader asks.

``core`` is the state machine (pure, thread-safe, no network); ``server`` serves it over HTTP
and holds the client, ``DynamicAssignment`` (``data.read(..., assignment="dynamic")``), and
how readers find the dispatcher (hosted by the chief / rank 0, see ``server``).
"""

from kubeai_train.data.dispatch.core import Dispatcher, DispatchError, Piece, ReaderStats

__all__ = ["DispatchError", "Dispatcher", "Piece", "ReaderStats"]
