"""Small helpers shared across layers."""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class FieldError(ValueError):
    """A ValueError caused by one input: ``field`` names it (a ``SamplingParams`` field, "prompt", or
    an argument of ``render_chat``), so that a caller can name it by its own name for it."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def cdiv(a: int, b: int) -> int:
    """Ceiling of ``a / b`` for non-negative ``a`` and positive ``b`` (blocks needed for ``a`` tokens)."""
    return -(a // -b)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the handlers they had: for
    a change of the engine's state that a ``KeyboardInterrupt`` (or a job's ``JobInterrupted``)
    landing half-way would leave inconsistent (a block table freed but not its blocks, a token
    appended but not its logprobs). Only the main thread receives signals; elsewhere, and for a
    signal ignored or whose handler Python does not own, the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for s in _DEFERRED_SIGNALS:
        handler = signal.getsignal(s)
        if handler is not None and handler is not signal.SIG_IGN:
            previous[s] = signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(received):
            signal.raise_signal(s)
