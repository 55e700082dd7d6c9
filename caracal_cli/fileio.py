"""Crash-safe file writing: everything the toolkit saves (shards, manifests, checkpoints, results) goes
through `atomic_write` (folders through `replace_dir`), so an interrupted run never leaves a half-written file
under the final name; and stopping: SIGTERM unwinds like Ctrl-C (`sigterm_as_interrupt`), so cleanups run."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from caracal_cli.config import CaracalError, warn


UMASK = os.umask(0)  # read once (it can only be read by setting it); files we make follow it
os.umask(UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside `path` for a writer that wants a filename; rename it over `path` when
    the block succeeds, delete it when it fails."""
    path = Path(path)
    if path.is_dir():  # else os.replace fails at the end, naming the temporary file
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; a shared dataset must be readable like any file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside `path`; on success fsync and rename it over `path`, on error delete it."""
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, as Ctrl-C raises KeyboardInterrupt: cleanups (temporary folders,
    child processes) run instead of the process dying at once. The trainer installs its own handlers for its loop."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within it, SIGTERM raises Terminated (only the main thread can set a handler; elsewhere nothing changes)."""
    import signal
    import threading

    def raise_terminated(signum, frame):
        raise Terminated()

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def signal_name(interrupt: KeyboardInterrupt) -> str:
    return "SIGTERM" if isinstance(interrupt, Terminated) else "SIGINT"


def exit_code(name: str) -> int:
    """The shell's exit status of a process stopped by signal `name` ("SIGINT": 130, "SIGTERM": 143)."""
    import signal

    return 128 + getattr(signal, name)


def stopping_signal(code: int) -> str | None:
    """The inverse of `exit_code` for the two signals a run stops on and saves (a child's exit status)."""
    return {exit_code(name): name for name in ("SIGINT", "SIGTERM")}.get(code)


def end_with_parent(parent: int, libc=None) -> None:
    """In a child process: be killed when the parent `parent` ends, however it ends (kill -9 included); exit now
    if it already has. `libc` loaded beforehand where nothing may be imported (between fork and exec). Linux only
    (a no-op elsewhere)."""
    import signal

    if not sys.platform.startswith("linux"):
        return
    if libc is None:
        import ctypes

        libc = ctypes.CDLL(None)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before that
        os._exit(1)


def set_aside(path: Path) -> Path:
    """Rename `path` into a new hidden `.old` folder beside it and return that folder: a directory about to be
    deleted or replaced leaves its name at once, and a kill midway leaves a hidden orphan, never half of it."""
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    path.rename(aside / path.name)
    return aside


def temp_dir_beside(final: Path, tag: str = "") -> Path:
    """A new hidden directory beside `final` to build it in before `replace_dir` renames it into place, with the
    umask's permissions (mkdtemp makes 0700, and the folder keeps them once renamed)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{tag}", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~UMASK)
    except BaseException:
        tmp.rmdir()
        raise
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename directory `tmp` to `final`. An existing `final` is renamed aside first and deleted only once the new
    one is in place, so an interruption leaves one of the two whole under `final` (at worst a hidden `.old`
    folder beside it), never a half-deleted mix."""
    if not final.exists():
        tmp.rename(final)
        return
    aside = set_aside(final)
    try:
        tmp.rename(final)
    except BaseException:
        (aside / final.name).rename(final)  # the old one back under its name
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_write(path, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.write("\n")


def write_report(report: Any, path: str | None, default_name: str) -> str | None:
    """A script's JSON report, atomically: to `path` (its --json), else to $OUT/`default_name` where OUT is set
    (the folder a GPU run's files come back from), else nowhere. Returns where it went."""
    if not path and os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], default_name)
    if path:
        write_json(path, report)
    return path


def write_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file` (streamed to the file, where `save` builds it in memory first), with the
    umask's permissions (it makes files 0600) and synced; its write errors (a full disk) as OSError, like every
    other file's. Write into a temporary directory or name."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        raise OSError(errno.EIO, str(err).splitlines()[0], str(path)) from None
    os.chmod(path, 0o666 & ~UMASK)
    with open(path, "rb") as written:
        os.fsync(written.fileno())


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_os_error(err: OSError) -> str:
    """An OSError as one line naming the file: 'PATH: No space left on device'."""
    where = err.filename if err.filename is not None else ""
    what = err.strerror or str(err) or type(err).__name__
    return f"{where}: {what}" if where else what


# --- one writer per directory ---------------------------------------------------------------------------
LOCK_FILE = ".caracal.lock"


class LockError(CaracalError):
    """Another process holds the directory (the message names it), or the directory cannot be locked."""


def _owner_line(owner: dict[str, Any]) -> str:
    command = str(owner.get("command") or "")
    command = command if len(command) <= 60 else command[:59] + "…"
    return f"pid {owner.get('pid')} on {owner.get('host')}" + (f" ({command})" if command else "")


def _read_owner(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        owner = json.loads(path.read_text())
        if isinstance(owner, dict):
            return owner
    return {}


def check_not_being_written(directory: str | Path, what: str = "dataset") -> None:
    """Refuse to read `directory` while a live process holds its DirectoryLock (half-written files), naming the
    writer in a LockError. Needs no write permission: the lock file is opened read-only (flock works on such a
    descriptor) and a shared lock is tried and dropped at once. A lock file no process holds is no obstacle."""
    import fcntl

    path = Path(directory) / LOCK_FILE
    while True:
        try:
            handle = open(path, "rb")  # noqa: SIM115 (closed below, which drops the shared lock)
        except OSError:  # no lock file: no writer (a missing or unreadable directory is the reader's to report)
            return
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(path)
                held = _owner_line(owner) if owner else "another process"
                raise LockError(f"{what} {directory} is being written by {held}; wait for it or use another "
                                f"{what}") from None
            except OSError:  # a file system without flock: nothing to learn
                return
            try:
                if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                    return
            except FileNotFoundError:  # its writer finished between our open and our lock
                return
        # else a new writer replaced the file between our open and our lock: look at its file


class DirectoryLock:
    """An advisory lock (flock) on DIR/.caracal.lock, held while one process writes a run or dataset directory.

    The lock file records its owner (pid, host, command). The kernel releases a flock when its process dies,
    however it dies, so a lock file that is present but not locked was left by a dead owner: it is taken over,
    with a warning naming that owner. A second writer fails at once with a LockError naming the holder. The
    file is removed on release; a process that opened it before the removal notices (the path no longer
    names the file it locked) and tries again."""

    def __init__(self, directory: str | Path, what: str = "directory"):
        self.directory, self.what = Path(directory), what
        self.path = self.directory / LOCK_FILE
        self.handle = None
        self.created = False  # the directory was made for the lock: removed on release if still empty

    def acquire(self) -> DirectoryLock:
        import fcntl  # POSIX only, like the rest of the toolkit's process handling

        if self.directory.exists() and not self.directory.is_dir():
            raise LockError(f"{self.directory}: exists and is not a directory")
        try:
            self.created = not self.directory.exists()
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LockError(f"cannot create {self.what} {self.directory} ({describe_os_error(err)})") from None
        while True:
            try:
                handle = open(self.path, "a+")  # noqa: SIM115 (held open for as long as the lock)
            except OSError as err:
                raise LockError(f"cannot write to {self.what} {self.directory} ({describe_os_error(err)})") from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(self.path)
                handle.close()
                held = _owner_line(owner) if owner else "another process"
                raise LockError(f"{self.directory} is in use by {held}: one writer at a time (wait for it to "
                                f"finish, or stop it)") from None
            except OSError as err:  # a file system without flock (some network mounts)
                handle.close()
                raise LockError(f"cannot lock {self.what} {self.directory} ({describe_os_error(err)})") from None
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()  # the previous owner removed the file between our open and our lock: again
        handle.seek(0)
        if handle.read().strip():
            stale = _read_owner(self.path) or {"pid": "?", "host": "?"}
            warn(f"{self.directory}: took over a stale lock left by {_owner_line(stale)}, which no longer holds "
                 f"it (killed or crashed)")
        handle.seek(0)
        handle.truncate()
        argv = sys.argv or [""]
        program = "caracal" if Path(argv[0]).name in ("caracal", "__main__.py") else Path(argv[0]).name
        command = " ".join([program, *argv[1:]]).strip()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                 "since": round(time.time())}) + "\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self.handle.close()  # closing drops the flock
        self.handle = None
        if self.created:
            with contextlib.suppress(OSError):
                self.directory.rmdir()  # only if empty: nothing was written after all

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
