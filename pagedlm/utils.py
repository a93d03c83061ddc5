"""Small helpers shared across layers."""

import numbers
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
T = TypeVar("T")


class FieldError(ValueError):
    """A ValueError caused by one input: ``field`` names it (a ``SamplingParams`` field, "prompt", or
    an argument of ``render_chat``), so that a caller can name it by its own name for it."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def unicode_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode (a lone surrogate, as a JSON input's escape gives:
    "surrogates not allowed at character 3"), which tokenizers cannot take, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{exc.reason} at character {exc.start}"
    return None


# Levels of objects and arrays a request's JSON value (a schema, tool definitions) may nest: code
# that walks it recurses (Python's limit is ~1,000 frames) and xgrammar's compile time grows
# faster than the depth (a 700-level schema took 40 s, 1,500 over 300 s).
MAX_JSON_DEPTH = 128


def nested_too_deeply(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` (dicts, lists and tuples, as ``json.loads`` gives) nests more than
    ``limit`` levels; walked without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def too_deep(where: str) -> str:
    """The error of a value ``where`` names that ``nested_too_deeply`` refuses."""
    return f"{where} nests objects and arrays more than {MAX_JSON_DEPTH} levels deep; pagedlm takes up to {MAX_JSON_DEPTH}"


def is_integer(value: object) -> bool:
    """An int or a numpy integer (what vLLM's ``int`` arguments take), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def cdiv(a: int, b: int) -> int:
    """Ceiling of ``a / b`` for non-negative ``a`` and positive ``b`` (blocks needed for ``a`` tokens)."""
    return -(a // -b)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the handlers they had
    (SIGTERM first): for a change of the engine's state that a ``KeyboardInterrupt`` (or a job's
    ``JobInterrupted``) landing half-way would leave inconsistent (a block table freed but not its
    blocks, a token appended but not its logprobs). Only the main thread runs signal handlers;
    elsewhere, and for a signal ignored or whose handler Python does not own, the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: h for s in _DEFERRED_SIGNALS if (h := signal.getsignal(s)) is not None and h is not signal.SIG_IGN}
    held: list[int] = []
    holding = True

    def hold(signum: int, frame: object) -> None:
        if holding:
            held.append(signum)
        else:  # between the end of the block and its handler's return
            _deliver(previous[signum], signum, frame)

    installed: list[int] = []  # a signal's own handler may raise before the next is installed (a review)
    try:
        for s in previous:
            installed.append(s)  # before: restoring a handler not yet replaced is harmless
            signal.signal(s, hold)
        yield
    finally:
        holding = False  # one step: from here a signal reaches its own handler, even before it is back
        for s in installed:
            signal.signal(s, previous[s])
        for s in sorted(set(held), key=_DEFERRED_SIGNALS.index, reverse=True):
            _deliver(previous[s], s, None)


def run_uninterrupted(action: Callable[[], T]) -> T:
    """``action()`` under ``deferred_signals``, run to its end even where a signal lands before the
    hold is in place (in the ``with`` statement's own set-up, whose exception would skip the
    action), its exception raised once the action is done: for a clean-up that an interrupt must
    not skip (found by a hunt: an interrupt landing there left an LLM refusing every later call
    as "already running")."""
    pending: BaseException | None = None
    while True:
        started = False
        try:
            with deferred_signals():
                started = True
                result = action()
        except BaseException as exc:
            if started:  # the action's own error, or a held signal delivered after it
                raise
            pending = exc  # a signal's, before anything was held: run the action again
            continue
        if pending is not None:
            raise pending
        return result


def _deliver(handler: Any, signum: int, frame: Any) -> None:
    if callable(handler):
        handler(signum, frame)
    else:  # SIG_DFL: the default action (SIGTERM ends the process)
        signal.signal(signum, handler)
        signal.raise_signal(signum)
