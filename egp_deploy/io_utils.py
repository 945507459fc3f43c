"""Atomic writers: every output goes to a temp file in the same folder and is renamed into place,
so a crash or an exception never leaves a half-written model, engine or report.

A device or FIFO given as an output (``--json /dev/null``) is written into in place, never renamed
over. Temp files are named ``.NAME.HOST-PID.XXXX.tmp``: a process killed mid-write (kill -9) leaves one
behind, and the next write into that place removes the ones whose process is gone
(:func:`remove_stale_temps`). :func:`atomic_files` commits several outputs together (all renamed at
the end, none on failure); :func:`folder_lock` keeps a second run out of a run folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


_HOST = socket.gethostname().replace("/", "_")
_TEMP_TAG = re.compile(r"\.(?P<host>[^/]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove temp files of interrupted writes in ``folder`` (those of ``name`` only, if given) whose
    writer is gone: tagged with this host and a dead pid, or untagged (older egp-deploy versions).
    Temps of live processes and of other hosts are kept. Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not (entry.name.startswith(f".{name}." if name else ".") and entry.name.endswith(".tmp")) \
                or not entry.is_file():
            continue
        tag = _TEMP_TAG.search(entry.name)
        if tag is not None:
            this_host = tag["host"] == _HOST or tag["host"].endswith("." + _HOST)
            if not this_host or _pid_alive(int(tag["pid"])):
                continue
        with contextlib.suppress(OSError):
            entry.unlink()
            removed.append(entry)
    return removed


def is_special_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` (links followed) is a device, FIFO or socket: something to write into, never
    to replace (renaming a file over ``/dev/null`` would turn it into a regular file)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _temp_for(path: Path) -> Path:
    """A temp file beside ``path``, to be renamed onto it; for a special file (written in place, never
    renamed onto) one in the system's temp folder: no stray file in /dev."""
    special = is_special_file(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp",
                               dir=None if special else path.parent)
    os.close(fd)
    return Path(tmp)


def _prepare(path: Path) -> None:
    if not is_special_file(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent, path.name)


def _put_in_place(tmp: Path, path: Path) -> None:
    """Commit a finished temp file: renamed onto ``path``, or for a device or FIFO its bytes written
    into it (a FIFO's reader gets the whole file; the special file stays what it is)."""
    if is_special_file(path):
        with open(tmp, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.unlink()
        return
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should look like any file
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    tmp_path = None
    try:
        _prepare(path)
        tmp_path = _temp_for(path)
        yield tmp_path
        _put_in_place(tmp_path, path)
    except OSError as e:  # a full disk, a read-only file system: the environment's fault, one line (exit 9)
        raise _output_error(e, path) from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def _output_error(e: OSError, path: Path | None, output: bool = True) -> Exception:
    from egp_deploy.errors import output_error

    return output_error(e, path, output) or e


class AtomicFiles:
    """Outputs staged by :func:`atomic_files`: ``path(target)`` gives the temp to write."""

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}

    def path(self, target: str | os.PathLike) -> Path:
        target = Path(target)
        if target not in self._staged:
            try:
                _prepare(target)
                self._staged[target] = _temp_for(target)
            except OSError as e:
                raise _output_error(e, target) from None
        return self._staged[target]

    def write_bytes(self, target: str | os.PathLike, data: bytes) -> Path:
        tmp = self.path(target)
        try:
            tmp.write_bytes(data)
        except OSError as e:
            raise _output_error(e, Path(target)) from None
        return Path(target)

    def output_error(self, e: OSError) -> Exception:
        """``e``, raised while writing one of the staged outputs, as the OutputError naming that
        output (not its temp file); ``e`` itself when it is not about the output's place."""
        named = {os.fspath(tmp): target for target, tmp in self._staged.items()}
        target = named.get(os.fspath(e.filename)) if isinstance(e.filename, (str, os.PathLike)) else None
        return _output_error(e, target, output=target is not None)

    def write_json(self, target: str | os.PathLike, obj: Any) -> Path:
        return self.write_bytes(target, _json_bytes(obj))

    def commit(self) -> None:
        """Put every staged output in place: devices and FIFOs written into first (a write can still
        fail there, and then no file has been renamed yet), then the renames, which cannot fill a disk."""
        for target, tmp in sorted(self._staged.items(), key=lambda item: not is_special_file(item[0])):
            try:
                _put_in_place(tmp, target)
            except OSError as e:
                raise _output_error(e, target) from None
            del self._staged[target]

    def discard(self) -> None:
        for tmp in self._staged.values():
            if tmp.exists():
                tmp.unlink()
        self._staged.clear()


@contextlib.contextmanager
def atomic_files() -> Iterator[AtomicFiles]:
    """Stage several outputs; rename them all into place only when the block succeeds, so a failed
    command writes none of them."""
    group = AtomicFiles()
    try:
        yield group
        group.commit()
    except OSError as e:  # written by the block itself (a plot saved into group.path(...))
        raise group.output_error(e) from None
    finally:
        group.discard()


@contextlib.contextmanager
def staged_files() -> Iterator[AtomicFiles]:
    """Like :func:`atomic_files`, but nothing is committed unless ``commit()`` is called: what is
    still staged when the block ends (an error, an early return) is discarded."""
    group = AtomicFiles()
    try:
        yield group
    except OSError as e:
        raise group.output_error(e) from None
    finally:
        group.discard()


# ---------------------------------------------------------------- run folders

LOCK_NAME = ".egp-lock"


def _lock_holder(lock: Path) -> dict[str, Any]:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str = "egp-deploy") -> Iterator[Path]:
    """Hold ``folder/.egp-lock`` for the block: a second run into the same folder is refused with the
    holder (command, pid, host, start time) named. A lock left by a dead process on this host is
    taken over; one from another host is honoured (remove it by hand if that host is gone)."""
    from egp_deploy.errors import UsageError

    folder = Path(folder)
    created = [d for d in (folder, *folder.parents) if not d.exists()]  # removed again if the run leaves them empty
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    me = {"command": command, "pid": os.getpid(), "host": _HOST, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            pid = holder.get("pid")
            if holder.get("host") == _HOST and isinstance(pid, int) and not _pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()  # stale: its process is gone
                continue
            if not holder:  # being written right now, or damaged: give the writer a moment
                time.sleep(0.05)
                holder = _lock_holder(lock)
            raise UsageError(
                f"{folder} is in use by another run ({holder.get('command', 'unknown command')}, pid "
                f"{holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started', '?')}); "
                f"wait for it to finish or choose another output folder (if no run is using it, delete {lock})"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise UsageError(f"cannot take the lock {lock}; remove it if no run is using {folder}")
    try:
        yield lock
    finally:
        if _lock_holder(lock).get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
        for d in created:  # deepest first: a run refused before writing anything leaves no folder behind
            with contextlib.suppress(OSError):
                d.rmdir()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and arrays, paths
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite_or_none(obj: Any) -> Any:
    """JSON has no NaN/Inf; write them as null so every report parses everywhere."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _json_bytes(obj: Any) -> bytes:
    text = json.dumps(_finite_or_none(json.loads(json.dumps(obj, default=_json_default))), indent=2)
    return (text + "\n").encode()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_bytes_atomic(path, _json_bytes(obj))


def read_small_file(path: str | os.PathLike, what: str, max_bytes: int) -> bytes:
    """The bytes of ``path``, a regular file of at most ``max_bytes``: InputFileError (exit 3) naming
    ``what`` for anything else. Opened without blocking and checked on the open descriptor, so a FIFO
    never hangs the reader and a device (``/dev/zero``) or a file grown meanwhile never fills memory."""
    from egp_deploy.errors import InputFileError

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise InputFileError(f"cannot read {what} {path}: {e.strerror or type(e).__name__}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputFileError(f"{what} {path} is not a regular file (a device, FIFO or socket)")
        if info.st_size > max_bytes:
            raise InputFileError(f"{what} {path} is {info.st_size:,} bytes, more than the {max_bytes:,} "
                                 "this reader accepts")
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise InputFileError(f"cannot read {what} {path}: {e.strerror or type(e).__name__}") from None
    if len(data) > max_bytes:
        raise InputFileError(f"{what} {path} grew beyond {max_bytes:,} bytes while being read")
    return data


def read_json_file(path: str | os.PathLike, what: str, max_bytes: int) -> Any:
    """JSON from a bounded regular file (:func:`read_small_file`); text that is not JSON, nested too
    deeply or holding numbers too long to convert is one InputFileError line, never a traceback."""
    from egp_deploy.errors import InputFileError, first_words

    data = read_small_file(path, what, max_bytes)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise InputFileError(f"{what} {path} is nested too deeply to be a JSON document this tool reads") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and int() refusing a 5,000-digit number
        raise InputFileError(f"{what} {path} is not readable JSON ({type(e).__name__}: {first_words(e, 120)})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_main_process() -> bool:
    """Rank 0 under torchrun (or no torchrun): the process that owns a run folder."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def run_folder(folder: str | os.PathLike, *, resume: bool, force: bool, command: str,
               run_files: str, keep: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Own ``folder`` for one run: locked against a second run (:func:`folder_lock`), temp files of
    interrupted writes removed, and a previous run in it (files matching the regex ``run_files``)
    never silently replaced: it is continued with ``resume``, deleted first with ``force``, and
    refused otherwise (UsageError, exit 2). Files in ``keep`` (the run's own input) are never deleted."""
    from egp_deploy.errors import UsageError

    folder = Path(folder)
    with folder_lock(folder, command):
        remove_stale_temps(folder)
        previous = sorted(p.name for p in folder.iterdir() if re.fullmatch(run_files, p.name))
        if previous and not resume:
            if not force:
                shown = ", ".join(previous[:4]) + (", ..." if len(previous) > 4 else "")
                raise UsageError(f"{folder} already holds a run ({shown}): pass --resume to continue it, "
                                 "--force to replace it, or choose another output folder")
            kept = {Path(p).resolve() for p in keep}
            for name in previous:
                if (folder / name).resolve() not in kept:
                    (folder / name).unlink()
        yield folder
