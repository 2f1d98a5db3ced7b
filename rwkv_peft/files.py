"""Every file the project writes: atomic writes, temp cleanup, the run lock, checks of outputs before work.

An output is written to a temp name beside its target, ``.<stem>.<pid>-<host>.<random>.tmp<suffix>`` (the
suffix kept for readers that go by it), and renamed over the target only once complete and synced, so a
reader sees the old file or the new one, never part of one. An exception removes the temp; SIGINT/SIGTERM
remove every live temp of the process before it stops; a temp whose process is gone (SIGKILL, power loss)
is removed by ``remove_stale_temps`` at the next run in that directory. One run at a time per output
directory: ``dir_lock``. ``RWKV_PEFT_PAUSE_BEFORE_RENAME`` is the kill tests' hook (see
``_pause_before_rename``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import fnmatch
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".rwkv_peft.lock"
PAUSE_ENV = "RWKV_PEFT_PAUSE_BEFORE_RENAME"
_HOST = re.sub(r"\W", "_", socket.gethostname().split(".")[0]) or "host"
_TEMP_RE = re.compile(r"^\.(?P<stem>.*)\.(?P<pid>\d+)-(?P<host>\w+)\.[0-9a-f]{8}\.tmp(?P<suffix>(\.[^.]*)?)$")

_live: set[Path] = set()  # temps (and the lock) this process must remove if a signal ends it
_previous_handlers: dict[int, object] = {}
_pauses: Counter = Counter()


# ----------------------------------------------------------------------------- signals


def _remove(p: Path) -> None:
    """Remove a temp: a file, or a folder being written (atomic_dir)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _remove_live() -> None:
    for p in list(_live):
        try:
            _remove(p)
        except OSError:
            pass
        _live.discard(p)


def _on_signal(signum: int, frame) -> None:
    """Remove live temps and the lock, then do what the signal did before (KeyboardInterrupt, or die)."""
    _remove_live()
    previous = _previous_handlers.get(signum)
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; its own will clean up
    for sig in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(sig)
        if current is not _on_signal and current != signal.SIG_IGN:  # an ignored signal stays ignored
            _previous_handlers[sig] = current
            signal.signal(sig, _on_signal)


# ----------------------------------------------------------------------------- atomic writes


def temp_name(path: Path) -> Path:
    """A fresh temp name beside ``path`` carrying this process's pid and host (see remove_stale_temps)."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{_HOST}.{secrets.token_hex(4)}.tmp{path.suffix}")


def _fsync(path: Path | str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot sync a directory
        if not directory or e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _pause_before_rename(path: Path) -> None:
    """Test hook for kill tests: ``RWKV_PEFT_PAUSE_BEFORE_RENAME=GLOB[#N]`` stops the N-th (default first)
    write whose file name matches GLOB just before its rename, after printing one line to stderr."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    pattern, _, nth = spec.partition("#")
    if not fnmatch.fnmatchcase(path.name, pattern):
        return
    _pauses[pattern] += 1
    if _pauses[pattern] == int(nth or 1):
        print(f"paused before rename: {path}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def _write_error(e: BaseException, path: Path, tmp: Path) -> BaseException:
    """torch's zip writer reports a failed write (a full disk) as a RuntimeError about stream positions;
    turn it into the OSError it is, naming the target instead of the temp."""
    if isinstance(e, OSError):
        if e.filename in (None, str(tmp), tmp):
            return OSError(e.errno, e.strerror or str(e), str(path))
        return e
    if isinstance(e, RuntimeError) and any(s in str(e) for s in ("inline_container", "write failed", "writing file")):
        try:
            full = shutil.disk_usage(path.parent).free < (1 << 20)
        except OSError:
            full = False
        if full:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return OSError(errno.EIO, f"write failed ({str(e).strip().splitlines()[0]})", str(path))
    return e


class PendingFile:
    """A temp file beside ``path`` (``.tmp``) that becomes ``path`` on commit() or disappears on discard(),
    or when SIGINT/SIGTERM end the process first; for writers that keep a file open across calls."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = temp_name(self.path)
        _install_handlers()
        _live.add(self.tmp)
        try:
            os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies
        except BaseException as e:  # a read-only directory: the error names the target, not the temp
            _live.discard(self.tmp)
            raise _write_error(e, self.path, self.tmp) from None

    def commit(self) -> None:
        """Sync the temp, rename it over ``path``, sync the directory (a crash keeps one or the other)."""
        try:
            _fsync(self.tmp)
            _pause_before_rename(self.path)
            os.replace(self.tmp, self.path)
        except BaseException as e:
            self.discard(e)
        _live.discard(self.tmp)
        _fsync(self.path.parent, directory=True)

    def discard(self, error: BaseException | None = None) -> None:
        """Remove the temp; re-raise ``error`` (as an OSError naming ``path`` when it was a write error)."""
        err = None if error is None else _write_error(error, self.path, self.tmp)
        self.tmp.unlink(missing_ok=True)
        _live.discard(self.tmp)
        if err is not None and err is not error:
            raise err from None
        if error is not None:
            raise error


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write; on success it is synced and renamed to ``path``.

    On any exception (or SIGINT/SIGTERM) the temp is removed and the target is left as it was. Write
    errors come out as OSError naming ``path`` (a full disk is ENOSPC even when torch's writer hit it).
    """
    pending = PendingFile(path)
    try:
        yield pending.tmp
    except BaseException as e:
        pending.discard(e)
    pending.commit()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``atomic_path`` for a folder (an HF model folder): yield a fresh temp folder beside ``path``; on success
    its files are synced and it takes the place of ``path`` in one rename (an existing folder is swapped out
    in one step where the system can, then removed). On failure or SIGINT/SIGTERM the temp folder goes."""
    path = Path(path)
    tmp = temp_name(path)
    _install_handlers()
    _live.add(tmp)
    try:
        tmp.mkdir()
        yield tmp
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp, directory=True)
        _pause_before_rename(path)
        if path.is_dir() and not path.is_symlink() and _exchange(tmp, path):
            shutil.rmtree(tmp)  # now the old folder
        else:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    except BaseException as e:
        _remove(tmp)
        raise _write_error(e, path, tmp) from None
    finally:
        _live.discard(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def read_json_object(path: Path) -> dict:
    """The JSON object in the file at ``path``; one ValueError naming the file otherwise."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temps (of ``name``, or any) in ``directory`` left by processes of this host that no
    longer run; returns what was removed."""
    directory, removed = Path(directory), []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TEMP_RE.match(p.name)
        if not m or (name is not None and m["stem"] + m["suffix"] != name) or m["host"] != _HOST:
            continue
        if int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            _remove(p)
            removed.append(p)
    return removed


def note_removed(removed: list[Path]) -> None:
    if removed:
        print(f"note: removed {len(removed)} temp file(s) left by killed runs in {removed[0].parent} "
              f"(e.g. {removed[0].name})", file=sys.stderr)


# ----------------------------------------------------------------------------- checks before heavy work


def check_writable_dir(directory: str | os.PathLike, what: str, create: bool = True) -> None:
    """One-line error, prefixed by ``what`` (the flag and its value), unless files can be created in
    ``directory`` (or, with ``create``, in the nearest existing parent that would hold it): missing, not a
    directory, read-only or no permission."""
    d = Path(directory)
    while not d.exists():
        if not create or d == d.parent:
            raise FileNotFoundError(f"{what}: directory {d} does not exist")
        d = d.parent
    if not d.is_dir():
        raise NotADirectoryError(f"{what}: {d} is not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: cannot write in {d} (read-only file system or no permission)")


def check_free_space(directory: str | os.PathLike, need: int, what: str) -> None:
    """One-line error, prefixed by ``what``, when the file system of ``directory`` has under ``need`` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < need:
        raise OSError(errno.ENOSPC, f"needs about {need / 2**20:.1f} MiB, only {free / 2**20:.1f} MiB free in "
                                    f"{directory}", what)


def _replaces(out: Path, inp: Path) -> str | None:
    """How writing ``out`` would replace the input ``inp`` (None: it would not)."""
    try:
        if not os.path.samefile(out, inp):  # stat follows symlinks; a hard link has the same inode
            folder = out.is_dir() and Path(os.path.realpath(out)) in Path(os.path.realpath(inp)).parents
            return "is a folder holding" if folder else None  # a folder output replaces all that is in it
    except OSError:  # one of them does not exist (yet): it cannot be the other
        return None
    if os.path.abspath(out) == os.path.abspath(inp):
        return "is"
    return "resolves through a symlink to" if os.path.realpath(out) == os.path.realpath(inp) else "is a hard link to"


def check_not_input(outputs: dict[str | os.PathLike, str], inputs: dict[str | os.PathLike, str]) -> None:
    """ValueError naming both, before any work, when one of ``outputs`` is one of ``inputs``: the same path,
    the same file through a symlink or a hard link, or (an output folder) the folder holding it. Each dict
    maps a path to what the user called it (``"--output data/x"``); replacing an input with an output would
    lose it, or leave a link to old data."""
    for out, out_flag in outputs.items():
        for inp, in_flag in inputs.items():
            how = _replaces(Path(out), Path(inp))
            if how is None:
                continue
            written = "" if out_flag.endswith(f" {out}") else f" (writes {out})"
            raise ValueError(f"{out_flag}{written} {how} the input {in_flag}: an output must not replace an "
                             f"input; choose another {out_flag.split()[0]}")


def describe(e: BaseException) -> str:
    """One line for an expected failure: the file, then the cause."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# ----------------------------------------------------------------------------- one run per directory


@contextmanager
def dir_lock(directory: str | os.PathLike, flag: str = "--proj_dir") -> Iterator[Path]:
    """Hold ``directory``/.rwkv_peft.lock (flock, with our pid in it) for the duration; another live holder
    is an error naming its pid; a lock left by a dead process is taken over with a note."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 200).decode(errors="replace").strip() or "unknown pid"
            os.close(fd)
            raise ValueError(f"{flag} {directory}: another run is using it ({owner}; lock {path}); "
                             f"wait for it to finish or choose another {flag}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: take the new one
    previous = os.read(fd, 200).decode(errors="replace").strip()
    if previous:
        print(f"note: {path}: taking over the lock left by {previous}, which no longer runs", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _install_handlers()
    _live.add(path)
    try:
        yield path
    finally:
        _live.discard(path)
        path.unlink(missing_ok=True)
        os.close(fd)
