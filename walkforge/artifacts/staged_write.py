"""The atomic bundle writer: a bundle is written whole or not at all.

`staged_bundle` stages everything in a hidden folder beside the destination and renames it into
place only when complete, so an interrupted or failed compile leaves nothing at the destination;
a folder left by a killed compile is removed by the next write there. A second write to the same
destination while one is in progress is refused. Used by the compiler and `walkforge build`.

`force` replacement is two renames: the old bundle into the partial folder (as PREVIOUS), then the
new one into place. The old bundle is never deleted while it is the only copy: a failed second
rename puts it back at once, and after a kill between the two (the destination absent, PREVIOUS
in a partial whose writer is gone) the next write to that destination puts it back before
anything else (`interrupted_replacement` names it meanwhile; the bundle reader's "not found"
says where it is).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn

from walkforge.errors import WalkforgeError

log = logging.getLogger(__name__)


@contextmanager
def staged_bundle(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a staging directory beside `out`; on success move it to `out` atomically.

    The staging directory sits in a hidden `.<out>.partial-<pid>-*` folder whose `owner` file
    this process holds locked. On any exception, SIGINT or SIGTERM the folder is removed and
    `out` is left as it was; a signal then acts as it would have (KeyboardInterrupt for SIGINT).
    After SIGKILL the folder stays, and the next write to `out` removes it: its lock died with
    its process, so a reused pid cannot make it look alive. The bundle gets dirs 0755 and files
    0644, less the umask.
    """
    out = Path(out).absolute()
    _put_back_interrupted(out)
    if out.exists() and not force:
        raise WalkforgeError(f"output {out} already exists (pass --force to replace it)")
    if out.exists() and os.path.ismount(out):
        raise WalkforgeError(f"cannot replace {out}: it is a mount point, which cannot be renamed "
                             "(write the bundle to a folder inside it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(out, exc) from None
    _remove_stale_partials(out)
    try:
        with _partial(out) as partial, _signal_guard() as guard:
            _refuse_if_another_writer(out, partial)
            stage = partial / STAGE
            stage.mkdir()  # 0o777 less the umask (and any default ACL), like any user's mkdir
            umask = ~stage.stat().st_mode & 0o777
            yield stage
            _ordinary_modes(stage, umask)
            guard.defer()  # no signal between the two renames: it would lose the old bundle
            _replace(stage, out, partial / PREVIOUS)
    except _Interrupted as exc:
        _resend(exc.signum)


def _unwritable(out: Path, exc: OSError) -> WalkforgeError:
    return WalkforgeError(f"cannot write output {out}: {exc.strerror or exc}")


def _replace(stage: Path, out: Path, previous: Path) -> None:
    """Rename `stage` to `out`; an existing `out` moves to `previous` (in the partial) first. If
    the second rename fails, the partial's cleanup (`_put_back`) returns `previous` to `out`."""
    if out.exists():
        try:
            os.replace(out, previous)
        except OSError as exc:
            raise WalkforgeError(f"cannot replace {out}: {exc.strerror or exc}") from None
    try:
        os.replace(stage, out)
    except OSError as exc:
        raise _unwritable(out, exc) from None


def _ordinary_modes(root: Path, umask: int) -> None:
    """Dirs 0755 and files 0644 less the umask, for anyone to read: mkdtemp made the partial
    0700 and some writers (tempfile) leave files 0600."""
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755 & ~umask)
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o644 & ~umask)


# -- partial folders: one per write in progress, removed by the next write once stale -------

OWNER, STAGE, PREVIOUS = "owner", "bundle", "previous"
"""In a partial: the lock file (holds the writer's pid), the bundle being written, the replaced one."""


@contextmanager
def _partial(out: Path) -> Iterator[Path]:
    """A new partial folder for `out`, its owner file locked until the folder is removed."""
    partial, lock = _new_partial(out)
    try:
        yield partial
    finally:
        try:
            if _put_back(partial, out):  # else kept, holding the only copy of the old bundle
                shutil.rmtree(partial, ignore_errors=True)
        finally:
            os.close(lock)  # after the removal, so no cleaner sees it unlocked


def _new_partial(out: Path) -> tuple[Path, int]:
    """Make a partial folder and lock its owner file. Another write's cleaner may remove the
    folder in the instant before the lock is taken; then make another."""
    while True:
        try:
            partial = Path(tempfile.mkdtemp(prefix=f"{_prefix(out)}{os.getpid()}-{time.time_ns()}-",
                                            dir=out.parent))
        except OSError as exc:
            raise _unwritable(out, exc) from None
        try:
            fd = os.open(partial / OWNER, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:
            continue
        with suppress(OSError):  # a filesystem without locks: cleaners cannot lock it either, and keep it
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a cleaner holds it
        if _is_at(fd, partial / OWNER):
            os.write(fd, f"{os.getpid()}\n".encode())
            return partial, fd
        os.close(fd)


def _is_at(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def _put_back(partial: Path, out: Path) -> bool:
    """Where `out` is absent and `partial` holds the bundle a `force` write moved away (PREVIOUS),
    rename it back to `out`. False if it is there and cannot be put back (keep the partial then)."""
    previous = partial / PREVIOUS
    if os.path.lexists(out) or not previous.is_dir():
        return True
    try:
        os.replace(previous, out)
    except OSError as exc:
        log.error("cannot put the old bundle %s back at %s: %s (it is kept there)", previous, out, exc)
        return False
    log.warning("put the old bundle back at %s: its replacement had been interrupted", out)
    return True


def interrupted_replacement(out: Path) -> Path | None:
    """The old bundle of an interrupted `force` replacement of `out` (absent), kept in a partial
    beside it; None if there is none."""
    out = Path(out).absolute()
    if os.path.lexists(out) or not out.parent.is_dir():
        return None
    with suppress(OSError):
        for partial in _partials(out):
            if (partial / PREVIOUS).is_dir():
                return partial / PREVIOUS
    return None


def _put_back_interrupted(out: Path) -> None:
    """Put back, at an absent `out`, the old bundle a killed `force` write left in its partial."""
    if interrupted_replacement(out) is None:
        return
    for path in _partials(out):
        _remove_if_stale(path, out)  # puts PREVIOUS back first, once its writer is gone


def _remove_stale_partials(out: Path) -> None:
    """Remove the partial folders beside `out` whose writer is gone; log how many and their size."""
    removed = []
    for path in _partials(out):
        size = _remove_if_stale(path, out)
        if size is not None:
            removed.append(size)
    if removed:
        log.warning("removed %d stale partial output(s) of killed writes beside %s (%.1f MB)",
                    len(removed), out, sum(removed) / 1e6)


def _refuse_if_another_writer(out: Path, mine: Path) -> None:
    """Refuse to write `out` while an older partial of it is held by a live writer. Called with
    our own partial locked, so of writers that start together exactly the oldest goes on: each
    either sees the other's lock or removed its not-yet-locked folder (whose writer then retries)."""
    key = _age(mine, out)
    for path in _partials(out):
        if path != mine and _age(path, out) < key and _remove_if_stale(path, out) is None:
            pid = path.name[len(_prefix(out)):].split("-", 1)[0]
            raise WalkforgeError(f"another walkforge process (pid {pid}) is writing {out}; "
                                 "wait for it to finish or stop it")


def _partials(out: Path) -> list[Path]:
    return [path for path in out.parent.iterdir()
            if path.name.startswith(_prefix(out)) and path.is_dir() and not path.is_symlink()]


def _age(partial: Path, out: Path) -> tuple[int, str]:
    """Creation order of `out`'s partial folders: the time in their name (`<pid>-<ns>-`), then the
    name. A folder named otherwise (an older walkforge's) counts as the oldest."""
    fields = partial.name[len(_prefix(out)):].split("-")
    return (int(fields[1]) if len(fields) > 2 and fields[1].isdigit() else 0), partial.name


def _remove_if_stale(partial: Path, out: Path) -> int | None:
    """Remove `partial` unless a live process holds its owner lock: its bytes, or None if kept. An
    old bundle in it that `out` lacks is put back first (`_put_back`), never removed."""
    try:
        fd = os.open(partial / OWNER, os.O_RDWR)
    except FileNotFoundError:  # from a walkforge before owner files, or killed before making one
        return _remove_tree(partial) if _put_back(partial, out) else None
    except OSError:  # e.g. another user's: not ours to judge
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by its live writer (or no locks on this filesystem: keep it)
        return None
    else:  # holding the lock, so no new writer can claim the folder
        return _remove_tree(partial) if _put_back(partial, out) else None
    finally:
        os.close(fd)


def _remove_tree(root: Path) -> int:
    size = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with suppress(FileNotFoundError):  # a concurrent cleaner got there first
                size += os.lstat(os.path.join(dirpath, name)).st_size
    shutil.rmtree(root, ignore_errors=True)
    return size


# -- signals: SIGINT/SIGTERM unwind a staged write through its cleanup ------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Interrupted(BaseException):
    """Raised by the guard's handler; `staged_bundle` catches it once the partial is removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _SignalGuard:
    """While up, STOP_SIGNALS raise `_Interrupted`; after `defer()` they are held until it comes
    down. Ignored signals stay ignored; outside the main thread (which alone may set handlers)
    nothing changes."""

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.pending: int | None = None
        self.deferring = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            handler = signal.getsignal(signum)
            if handler not in (signal.SIG_IGN, None):  # None: set outside Python, cannot be restored
                self.previous[signum] = handler
                signal.signal(signum, self._handle)

    def defer(self) -> None:
        self.deferring = True

    def restore(self) -> None:
        self.deferring = True
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.pending is not None:
            raise _Interrupted(self.pending)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.deferring:
            self.pending = signum
        else:
            raise _Interrupted(signum)


@contextmanager
def _signal_guard() -> Iterator[_SignalGuard]:
    guard = _SignalGuard()
    try:
        guard.install()
        yield guard
    finally:
        guard.restore()


def _resend(signum: int) -> NoReturn:
    """Deliver `signum` again to the handler it had before (the partial is gone by now):
    KeyboardInterrupt for SIGINT, the default exit for SIGTERM."""
    try:
        signal.raise_signal(signum)
    except BaseException as exc:  # the handler's own (KeyboardInterrupt), shown without _Interrupted
        raise exc from None
    raise WalkforgeError(f"interrupted by {signal.Signals(signum).name}")  # its handler returned
