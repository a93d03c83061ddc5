"""A job's progress: a tqdm bar on a terminal, a plain line every few seconds in a log, a summary."""

import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from pagedlm.entrypoints.progress_bar import tqdm


@dataclass
class JobStats:
    """Counts of one run of a job (a resumed run counts what it did, plus ``skipped``)."""

    rows: int = 0  # input rows read, skipped ones included
    completed: int = 0
    errors: int = 0
    skipped: int = 0  # already in the output when the run started (--resume)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.completed + self.errors + self.skipped

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def summary(self, interrupted: bool) -> dict:
        """This run's counts; ``unfinished`` rows were read but not written (in flight when the run
        was interrupted: ``--resume`` runs them)."""
        wall = self.elapsed()
        counts = {k: v for k, v in asdict(self).items() if k != "started"}
        return {**counts, "unfinished": self.rows - self.done, "interrupted": interrupted, "wall_time_s": round(wall, 3),
                "generated_tokens_per_s": round(self.completion_tokens / wall, 1) if wall > 0 else None,
                "total_tokens_per_s": round((self.prompt_tokens + self.completion_tokens) / wall, 1) if wall > 0 else None}


class Progress:
    """Shows ``JobStats`` as rows finish.

    On a terminal (stderr is a TTY) a tqdm bar; otherwise (batch schedulers, ``nohup``, CI logs)
    one line on stderr every ``interval`` seconds, from a thread, so a log shows the job is alive
    while long rows generate: rows done / total, errors, generated tokens/s of the finished rows,
    and the ETA. ``interval`` 0: a line each time a row is done instead.
    """

    def __init__(self, stats: JobStats, total: int | None, interval: float, tty: bool | None = None) -> None:
        self.stats = stats
        self.total = total
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._bar = tqdm(total=total, initial=stats.done, desc="Rows", unit="row", dynamic_ncols=True) if self.tty else None
        self._printed_done: int | None = None
        self._stop = threading.Event()
        self._thread = None
        self._every_row = not self.tty and interval == 0
        if not self.tty and interval > 0:
            self._thread = threading.Thread(target=self._print_every, args=(interval,), daemon=True)
            self._thread.start()

    def update(self) -> None:
        """One more row done."""
        if self._bar is not None:
            self._bar.update()
            self._bar.set_postfix_str(f"errors: {self.stats.errors}, {self._rate():.1f} gen tok/s", refresh=False)
        elif self._every_row:
            self._print_line()

    def _print_every(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._print_line()

    def _rate(self) -> float:
        return self.stats.completion_tokens / max(self.stats.elapsed(), 1e-9)

    def _print_line(self) -> None:
        s = self.stats
        done = s.done
        of = f"/{self.total} ({100 * done / self.total:.1f}%)" if self.total else ""
        eta = ""
        run_rows = s.completed + s.errors
        if self.total and run_rows:
            remaining = (self.total - done) * s.elapsed() / run_rows
            eta = f", ETA {_duration(remaining)}"
        say(f"[pagedlm run] rows {done}{of}, errors {s.errors}, {self._rate():.1f} generated tok/s, "
            f"elapsed {_duration(s.elapsed())}{eta}")
        self._printed_done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self._printed_done != self.stats.done:
            self._print_line()


def say(text: str) -> None:
    """Print a job's note on stderr. Notes are best effort: once stderr's reader has gone (a pipe to
    ``head``, a log shipper restarting) the job runs on with stderr on /dev/null, so that later
    notes, warnings and the interpreter's exit write nowhere rather than fail (found by a hunt: the
    BrokenPipeError ended a job, or lost its summary at the end)."""
    try:
        print(text, file=sys.stderr, flush=True)
    except ValueError:  # stderr closed in this process
        pass
    except OSError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stderr.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # a stderr without a file descriptor
            pass


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
