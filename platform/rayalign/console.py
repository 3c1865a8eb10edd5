"""What a person sees while rayalign works, and where everything else goes.

The console shows rayalign's own messages (the ``rayalign`` logger: what it is doing, the counts,
warnings, the pathology alarm), one progress bar for training on a terminal or one line per logged
step otherwise, and the final table. Everything Ray and the libraries print (Ray Data's operator
progress, actor restarts, Ray Train's reports, the workers' forwarded output) is written to a log
file in the run directory instead, whose path is shown; ``--verbose`` leaves it on the console.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from rayalign.config import ConfigError
from rayalign.metrics import ABSOLUTE_ACCURACY, FRAC_IN_U, LOSS, PAIRS_PER_S, REWARD_ACCURACY, STEP, FirstAlarm

log = logging.getLogger("rayalign")

LOG_FILE = "logs/rayalign.log"  # in the run directory


def _open_log(path: Path, mode: int) -> int:
    """The log file, the owner's alone (it holds configs and paths), and never through a link planted in its
    place; ``mode``: ``os.O_TRUNC`` or ``os.O_EXCL``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        if path.is_symlink():
            raise ConfigError(
                f"{path} is a symbolic link; rayalign does not write its log through one "
                "(remove it, or set another output.root)"
            ) from None
        raise ConfigError(f"cannot write the log {path}: {err.strerror}") from None
    os.fchmod(fd, 0o600)  # a log left by an earlier version keeps its mode otherwise
    return fd


def step_line(row: dict[str, Any], total_steps: int) -> str:
    """One logged step as a person reads it (a metric the row does not have, as n/a: no reference scored)."""

    def value(key: str) -> str:
        return f"{row[key]:.3f}" if key in row else "n/a"

    return (
        f"step {row[STEP]}/{total_steps} loss={row[LOSS]:.4f} reward_acc={value(REWARD_ACCURACY)} "
        f"abs_acc={value(ABSOLUTE_ACCURACY)} frac_in_U={value(FRAC_IN_U)} pairs/s={row[PAIRS_PER_S]:.1f}"
    )


class Console:
    """The terminal (or pipe) this command was given, kept apart from the process's stdout/stderr.

    :meth:`capture` points file descriptors 1 and 2, and ``sys.stdout``/``sys.stderr``, at a log
    file: Ray's log forwarding, progress bars and child processes write there. The ``rayalign``
    logger keeps writing to the console (and to the log file, so the log reads in order).
    """

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.log_path: Path | None = None
        self._pending_for: Path | None = None  # where the log goes once its run is claimed
        self._log_handler: logging.Handler | None = None
        self._closed = False
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            fds = (sys.stdout.fileno(), sys.stderr.fileno())
        except (AttributeError, OSError, ValueError):  # streams without a descriptor (a test's capture)
            fds = None
        self.can_capture = fds is not None and not verbose
        if fds is None:
            self.stream, self.error_stream = sys.stdout, sys.stderr
        else:
            self.stream = os.fdopen(os.dup(fds[0]), "w", buffering=1)
            self.error_stream = os.fdopen(os.dup(fds[1]), "w", buffering=1)
            self._saved_fds = (os.dup(1), os.dup(2))
        self.is_terminal = self.stream.isatty()
        self._saved_streams = (sys.stdout, sys.stderr)
        handler = logging.StreamHandler(self.stream)
        handler.setFormatter(logging.Formatter("[rayalign] %(message)s"))
        self._console_handler = handler
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False

    def capture(self, run_dir: Path, claim_first: bool = False) -> Path | None:
        """From now on, everything but rayalign's own messages goes to ``run_dir/logs/rayalign.log``
        (with ``--verbose``, nowhere new). Returns the log file, which is also announced.

        ``claim_first`` (a command that claims its run directory: train, sweep): the log is written beside the
        run directory until :meth:`adopt_log` moves it in, once the claim succeeded; a refused command never
        touches the log of the run that holds the name (nor, at the end, its copy in storage)."""
        if not self.can_capture:
            return None
        path = run_dir / LOG_FILE
        if claim_first:
            self._pending_for = path
            path = run_dir.parent / f".{run_dir.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.log.pending"
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        fd = _open_log(path, os.O_EXCL if claim_first else os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        if self.log_path is None:
            sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
            sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
        else:  # the streams already write to fds 1 and 2 through their own dups: point those too
            os.dup2(1, sys.stdout.fileno())
            os.dup2(2, sys.stderr.fileno())
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
        self._log_handler = logging.StreamHandler(sys.stdout)
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s [rayalign] %(message)s"))
        log.addHandler(self._log_handler)
        self.log_path = path
        log.info("Ray's and the libraries' output: %s (--verbose shows it here)", self._pending_for or path)
        return path

    @property
    def log_pending(self) -> bool:
        """The log waits for its run's claim (see :meth:`capture`)."""
        return self._pending_for is not None

    def adopt_log(self) -> None:
        """The run directory is this run's now: its log moves in (a rename: writing goes on unbroken)."""
        if self._pending_for is None or self.log_path is None:
            return
        final, self._pending_for = self._pending_for, None
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.is_symlink():
            raise ConfigError(
                f"{final} is a symbolic link; rayalign does not write its log through one "
                "(remove it, or set another output.root)"
            )
        os.replace(self.log_path, final)
        self.log_path = final

    def print(self, text: str = "") -> None:
        """Final results (tables, where the files are): on the console, and in the log."""
        self.stream.write(text + "\n")
        self.stream.flush()
        if self.log_path is not None:
            sys.stdout.write(text + "\n")

    def error(self, text: str) -> None:
        """A line for the real stderr (and the log)."""
        self.error_stream.write(text + "\n")
        self.error_stream.flush()
        if self.log_path is not None:
            sys.stderr.write(text + "\n")

    def close(self) -> None:
        """Give the process its stdout and stderr back (once)."""
        if self._closed:
            return
        self._closed = True
        sys.stdout.flush()
        sys.stderr.flush()
        if self.log_path is not None:
            sys.stdout, sys.stderr = self._saved_streams
            os.dup2(self._saved_fds[0], 1)
            os.dup2(self._saved_fds[1], 2)
        for handler in (self._console_handler, self._log_handler):
            if handler is not None:
                log.removeHandler(handler)
        if self.log_pending and self.log_path is not None:  # refused before its claim: nothing of it is kept
            self.log_path.unlink(missing_ok=True)
            self.log_path = None
        log.propagate = True
        self.stream.flush()
        self.error_stream.flush()


class TrainingProgress:
    """Training's progress as rows arrive from rank 0: one bar on a terminal, else one line per logged
    step; the pathology alarm when it first fires."""

    def __init__(self, console: Console | None, total_steps: int, run_name: str):
        self.total_steps = total_steps
        self.first_alarm = FirstAlarm()
        self.bar = None
        if console is not None and console.is_terminal and not console.verbose:
            from tqdm.auto import tqdm

            # A terminal that reports no size (0 columns) gets 100: tqdm would draw an empty bar.
            width = shutil.get_terminal_size((100, 24)).columns
            self.bar = tqdm(total=total_steps, desc=run_name, unit="step", file=console.stream, ncols=width, leave=True)

    def show(self, row: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(max(0, min(row[STEP], self.total_steps) - self.bar.n))  # after a restart: stays
            self.bar.set_postfix_str(
                f"loss={row[LOSS]:.4f} abs_acc={row[ABSOLUTE_ACCURACY]:.3f} pairs/s={row[PAIRS_PER_S]:.1f}"
            )
        else:
            log.info(step_line(row, self.total_steps))
        alarm = self.first_alarm.of(row)
        if alarm:
            if self.bar is not None:
                self.bar.clear()
            log.warning("PATHOLOGY ALARM at step %d: %s", row[STEP], alarm)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
