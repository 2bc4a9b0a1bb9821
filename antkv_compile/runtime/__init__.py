"""Run-time state of the ``antkv`` backend: the per-layer quantized stores that the compiled graphs drive.

See :mod:`antkv_compile.runtime.state` for the design (where the state lives and why).
"""
from .state import Session, get_session, session_for, release_dense

__all__ = ["Session", "get_session", "session_for", "release_dense"]
