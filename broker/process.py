"""Child processes that do not outlive their parent (the sandbox, redis-server, the stack's roles)."""

from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import Callable


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up here, in the parent: the child between fork and exec only calls it (no dlopen
# there, where another thread of the parent may have held the loader's lock at the fork).
_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the parent dies, even by SIGKILL (Linux).

    Only for children started from a process's main thread: Linux signals the child when
    the *thread* that forked it exits. Best effort elsewhere: an orphan is stopped by hand.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
