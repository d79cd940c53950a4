"""Bundle v1: a directory with `manifest.json` at its root.

The writer stages everything in a hidden folder beside the destination and renames it into
place only when complete, so an interrupted or failed compile leaves nothing at the destination;
a folder left by a killed compile is removed by the next write there (`staged_bundle`). The
reader refuses foreign bundles, unknown format versions, any path the manifest names that is not
inside the bundle (artifacts/paths.py), a file present but not listed or listed but absent, and any
file whose size or sha256 differs from the manifest, naming the file. Each file is hashed once;
later opens trust a per-user stamp of its size, times and inode ("stamps" below) and hash only
what changed. A second write to the same destination while one is in progress is refused.

A bundle's digest is the sha256 of its manifest bytes, which hold every other file's sha256: pin it
(`Bundle.open(root, digest=...)`, `check_digest`) to load only the bundle that was tested. It is
not a signature: whoever can write the bundle can write a manifest to match.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
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

from walkforge.artifacts.paths import check_listed_exactly, check_paths, inside
from walkforge.artifacts.schema import check_schema
from walkforge.artifacts.stamps import file_stamp, read_stamps, write_stamps
from walkforge.errors import WalkforgeError

log = logging.getLogger(__name__)
FORMAT = "walkforge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `root` except the manifest, by relative path."""
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


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
    if out.exists() and not force:
        raise WalkforgeError(f"output {out} already exists (pass --force to replace it)")
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
    """Rename `stage` to `out`; an existing `out` moves to `previous` (in the partial) first."""
    if out.exists():
        os.replace(out, previous)
    os.replace(stage, out)


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
        shutil.rmtree(partial, ignore_errors=True)
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


def _remove_stale_partials(out: Path) -> None:
    """Remove the partial folders beside `out` whose writer is gone; log how many and their size."""
    removed = []
    for path in _partials(out):
        size = _remove_if_stale(path)
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
        if path != mine and _age(path, out) < key and _remove_if_stale(path) is None:
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


def _remove_if_stale(partial: Path) -> int | None:
    """Remove `partial` unless a live process holds its owner lock: its bytes, or None if kept."""
    try:
        fd = os.open(partial / OWNER, os.O_RDWR)
    except FileNotFoundError:  # from a walkforge before owner files, or killed before making one
        return _remove_tree(partial)
    except OSError:  # e.g. another user's: not ours to judge
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by its live writer (or no locks on this filesystem: keep it)
        return None
    else:
        return _remove_tree(partial)  # holding the lock, so no new writer can claim the folder
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


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Fill format fields and the file table, then write `manifest.json` (itself atomically)."""
    manifest = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION}
    manifest["files"] = file_table(root)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    """Parse and check the manifest's format fields (no file hashing)."""
    return _read_manifest(Path(root))[0]


def manifest_digest(root: Path | str) -> str:
    """The bundle's digest: sha256 of its manifest bytes (hex)."""
    return _read_manifest(Path(root))[1]


def _read_manifest(root: Path) -> tuple[dict[str, Any], str]:
    """(manifest, digest) from one read of the manifest's bytes."""
    if not root.exists():
        raise WalkforgeError(f"bundle not found: {root}")
    if not root.is_dir():
        raise WalkforgeError(f"{root} is not a bundle directory")
    path = root / MANIFEST
    if not path.is_file():
        raise WalkforgeError(f"{root} is not a walkforge bundle: no {MANIFEST}")
    try:
        data = path.read_bytes()
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise WalkforgeError(f"{path}: corrupt manifest ({exc})") from None
    except OSError as exc:
        raise WalkforgeError(f"{path}: cannot read the manifest: {exc.strerror or exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise WalkforgeError(f"{path}: not a walkforge bundle manifest (foreign format)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise WalkforgeError(
            f"{path}: bundle format version {version!r}, this walkforge reads version {FORMAT_VERSION}"
        )
    return manifest, hashlib.sha256(data).hexdigest()


def normal_digest(digest: str) -> str:
    """`digest` as 64 lowercase hex digits (a `sha256:` prefix is accepted); refuse anything else."""
    value = digest.strip().lower().removeprefix("sha256:") if isinstance(digest, str) else ""
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise WalkforgeError(f"--digest must be the 64 hex digits `walkforge inspect` prints, got {digest!r}")
    return value


def check_digest(bundle: Bundle, expected: str | None) -> Bundle:
    """`bundle` if its digest is `expected` (or nothing is pinned); else refuse, naming both."""
    if expected is not None and bundle.digest != normal_digest(expected):
        raise WalkforgeError(f"bundle {bundle.root} has digest {bundle.digest}, not the pinned "
                             f"{normal_digest(expected)}; refused")
    return bundle


def verify_files(root: Path, manifest: dict[str, Any], digest: str | None = None,
                 rehash: bool = False) -> int:
    """Check each listed file's size and sha256; refuse missing, truncated or changed files.

    With the bundle's `digest`, a file whose stamp (artifacts/bundle.py "Stamps") still matches
    is trusted without hashing it, and the stamps are renewed after a check; `rehash` hashes
    every file all the same. Returns how many files were hashed."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise WalkforgeError(f"{Path(root) / MANIFEST}: manifest has no files table; cannot verify it")
    for rel, entry in files.items():
        if not isinstance(entry, dict) or not {"size", "sha256"} <= entry.keys():
            raise WalkforgeError(f"{Path(root) / MANIFEST}: malformed files entry for {rel}")
    check_listed_exactly(Path(root), set(files), MANIFEST)
    stamps = {} if digest is None or rehash else read_stamps(Path(root), digest)
    seen, hashed = {}, 0
    for rel, entry in files.items():
        path = inside(Path(root), rel, f"files[{rel!r}]")
        if not path.is_file():
            raise WalkforgeError(f"bundle file missing: {rel}")
        seen[rel] = file_stamp(path)
        size = seen[rel][0]
        if size != entry["size"]:
            raise WalkforgeError(
                f"bundle file {rel} is {size} bytes, manifest says {entry['size']} (truncated or altered)"
            )
        if stamps.get(rel) == seen[rel]:
            continue
        hashed += 1
        if sha256_file(path) != entry["sha256"]:
            raise WalkforgeError(f"bundle file {rel} fails its sha256 check (tampered or corrupt)")
    if digest is not None and (hashed or set(stamps) != set(seen)):
        write_stamps(Path(root), digest, seen)
    return hashed


# -- kinds: a full bundle carries the torch reference weights, a deployment bundle does not ----

def has_reference_weights(manifest: dict[str, Any]) -> bool:
    """Whether the bundle carries the torch reference copy of its weights (`weights.file`); a
    `--no-reference-weights` bundle has its weights once, in the engines' files."""
    weights = manifest.get("weights")
    return isinstance(weights, dict) and bool(weights.get("file"))


def bundle_kind(manifest: dict[str, Any]) -> str:
    """"full" (engines and the torch reference weights) or "deployment" (engines only)."""
    return "full" if has_reference_weights(manifest) else "deployment"


def require_reference_weights(bundle: Bundle, what: str) -> None:
    """Refuse, in one line naming `what` needs them, a bundle without reference weights."""
    if not has_reference_weights(bundle.manifest):
        raise WalkforgeError(f"{what} needs the torch reference weights, which bundle {bundle.root} does "
                             "not carry (a deployment bundle, compiled with --no-reference-weights): "
                             "run it on an engine backend (cpu, cuda, trt), or recompile without the flag")


class Bundle:
    """An opened, verified bundle: its root, manifest and digest (None for one being staged)."""

    def __init__(self, root: Path, manifest: dict[str, Any], digest: str | None = None) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.digest = digest
        self.hashed = 0  # files whose sha256 `open` computed (the rest were trusted by their stamps)

    @classmethod
    def open(cls, root: Path | str, verify: bool = True, digest: str | None = None,
             integrity: bool = False) -> Bundle:
        """Read `root`'s manifest and refuse any path in it that leaves the bundle; with `verify`,
        refuse unlisted, missing or altered files (hashing each file once, then trusting its stamp
        while its size, times and inode are unchanged; `integrity` hashes every file again);
        with `digest`, a bundle of another digest. A manifest the runtime cannot read
        (artifacts/schema.py) is refused too."""
        manifest, actual = _read_manifest(Path(root))
        bundle = check_digest(cls(Path(root), manifest, actual), digest)
        check_paths(bundle.root, manifest)
        check_schema(manifest, str(bundle.root / MANIFEST))
        if verify or integrity:
            bundle.hashed = verify_files(bundle.root, manifest, actual, rehash=integrity)
        return bundle

    @property
    def recipe(self) -> str:
        return self.manifest["recipe"]

    @property
    def kind(self) -> str:
        return bundle_kind(self.manifest)

    def walk(self, name: str) -> dict[str, Any]:
        walks = self.manifest["walks"]
        if name not in walks:
            raise WalkforgeError(f"bundle has no walk '{name}'; walks: {', '.join(walks)}")
        return walks[name]

    def path(self, rel: str, entry: str = "path") -> Path:
        """`root / rel`, refused unless it stays inside the bundle (artifacts/paths.py)."""
        return inside(self.root, rel, entry)
