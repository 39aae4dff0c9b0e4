"""Which Lambda invocation a piece of work belongs to, in the local stack.

On AWS every function runs in its own sandbox, under its own role, and is stopped at its
timeout. The local stack runs them all in one process, so it tags each piece of work with the
invocation it belongs to: the function's name (which role its AWS calls run under) and its
deadline (after which Lambda would have stopped it). A context variable carries the tag; the
Lambda code copies its context into the threads it starts, so a sender's pool threads carry
the tag of the invocation that started them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field


class InvocationAbandoned(BaseException):
    """Lambda stopped this invocation at its timeout: nothing it does afterwards takes effect.

    A BaseException, so the handler's own `except Exception` cannot swallow it and carry on.
    """


@dataclass
class Invocation:
    """One run of one function: its name, and when Lambda would stop it."""

    function: str
    deadline: float | None = None  # time.monotonic(); None: no limit (the API's requests)
    _abandoned: threading.Event = field(default_factory=threading.Event, repr=False)

    def remaining_seconds(self) -> float:
        if self.deadline is None:
            return float("inf")
        return max(0.0, self.deadline - time.monotonic())

    def abandon(self) -> None:
        """Lambda has stopped this invocation: every later AWS or gateway call fails."""
        self._abandoned.set()

    @property
    def abandoned(self) -> bool:
        return self._abandoned.is_set() or (
            self.deadline is not None and time.monotonic() >= self.deadline
        )

    def check(self) -> None:
        """Raise InvocationAbandoned if Lambda would have stopped this invocation by now."""
        if self.abandoned:
            raise InvocationAbandoned(f"{self.function} ran past its timeout and was stopped")


_current: ContextVar[Invocation | None] = ContextVar("lambda_invocation", default=None)


def current() -> Invocation | None:
    """The invocation this code runs in, if the local stack tagged it."""
    return _current.get()


@contextmanager
def running(function: str, timeout_seconds: float | None = None) -> Iterator[Invocation]:
    """Run the enclosed code as one invocation of `function` (with its timeout, if any)."""
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    invocation = Invocation(function, deadline)
    token = _current.set(invocation)
    try:
        yield invocation
    finally:
        _current.reset(token)
