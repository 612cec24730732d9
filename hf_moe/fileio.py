"""Writing output folders and files atomically: everything goes to a temporary sibling that is renamed into
place only once complete, so a failed or interrupted run never leaves a half-written model behind.

A process killed with SIGKILL (or by the OOM killer, or a lost node) runs no cleanup, so its temporary sibling
would stay forever, as large as the model. Temporary names therefore carry the writer's host and pid
(`.NAME.tmp-HOST-PID-RANDOM`); the next write to the same target removes those whose writer is gone.

One writer per output folder: a command holds an exclusive lock on its output folder while it writes it
(`OutputDirLock`, the sibling file `.NAME.lock`); a second run on the same folder is refused at once with
`OutputFolderLocked`, naming the holder. The lock is an `fcntl.flock`, which the kernel releases when its process
dies however it dies, so the lock of a killed run is simply taken over by the next one (with a warning).
"""

import contextlib
import datetime
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)

# `.NAME.tmp-HOST-PID-RANDOM` (a folder or file being written) and `.NAME.old-HOST-PID-RANDOM` (the previous
# output, moved aside during an overwrite). HOST has its dashes replaced, so the pid is the second field.
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[^-]+)-(?P<pid>\d+)-[^-]+$")


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "localhost"


def _sibling_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{_host()}-{os.getpid()}-"


def _writer_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove the temporary siblings of `target` left by writers on this host that no longer run (killed
    mid-write). Siblings of live writers and of other hosts (shared file systems) are kept. Returns the removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for sibling in target.parent.glob(f".{glob_escape(target.name)}.*-*"):
        match = _SIBLING.match(sibling.name)
        if not match or match["name"] != target.name or match["host"] != _host():
            continue
        if _writer_is_alive(int(match["pid"])):
            continue
        logger.warning(f"Removing {sibling}, left behind by an interrupted write (process {match['pid']}).")
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


# ----------------------------------------------------------------------------------------------------------------
# One writer per output folder
# ----------------------------------------------------------------------------------------------------------------


class OutputFolderLocked(OSError):
    """The output folder is being written by another run (another process, here or on another host)."""


LOCK_SUFFIX = ".lock"

# The locks this process holds: {lock file: [fd, number of holds, pid that took it]}. flock locks belong to an open
# file description, so a second open + flock of the same file in this process would refuse ourselves; nested holds
# (a training job writing its folder through `atomic_output_dir`, a Python caller running two commands on one
# folder) share the one descriptor instead.
_HELD: dict[Path, list] = {}
_HELD_GUARD = threading.RLock()


def lock_path(output_dir: str | Path) -> Path:
    """The lock file of `output_dir`: `.NAME.lock` beside it, not in it, since an atomic write renames a temporary
    folder into place (a lock inside would be replaced with the folder)."""
    output_dir = Path(output_dir).expanduser().resolve()
    return output_dir.parent / f".{output_dir.name}{LOCK_SUFFIX}"


def _holder_record(output_dir: Path) -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "output_dir": str(output_dir),
    }


def _read_holder(fd: int, wait: float = 0.0) -> dict | None:
    """The holder record in the lock file open as `fd` (None when empty or unreadable). A holder writes it just
    after taking the lock, so a reader that lost the race may wait up to `wait` seconds for it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            data = os.pread(fd, 65536, 0)
            record = json.loads(data) if data.strip() else None
            if isinstance(record, dict):
                return record
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def describe_holder(record: dict | None) -> str:
    if not record:
        return "another process (it has not written its name into the lock yet)"
    return (
        f"process {record.get('pid')} on host {record.get('host')}, started {record.get('started')}, command "
        f"`{record.get('command')}`"
    )


def _locked_error(output_dir: Path, path: Path, holder: dict | None) -> OutputFolderLocked:
    return OutputFolderLocked(
        f"Output folder {output_dir} is being written by another run: {describe_holder(holder)}. Two runs writing "
        "one folder would mix their results; wait for that run to finish (or stop it), or choose another "
        f"--output_dir. Its lock {path} is released when that process ends, however it ends."
    )


def _open_lock_file(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)


def _acquire(output_dir: Path) -> Path:
    """Take (or, if this process holds it already, re-enter) the lock of `output_dir`; returns its lock file."""
    path = lock_path(output_dir)
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is not None and held[2] == os.getpid():
            held[1] += 1
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = _open_lock_file(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd, wait=1.0)
                os.close(fd)
                raise _locked_error(output_dir, path, holder) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder removes the file as it releases: if that happened between our open and our
            # flock, we locked a file nobody else will open. Lock the file the path names now instead.
            try:
                current, mine = os.stat(path), os.fstat(fd)
                if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _read_holder(fd)
        if previous:
            # Only a holder that never released (SIGKILL, OOM killer, a lost node) leaves its record behind.
            logger.warning(
                f"Taking over the lock of {output_dir} left by {describe_holder(previous)}, which ended without "
                "releasing it (killed?)."
            )
        record = json.dumps(_holder_record(output_dir)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        _HELD[path] = [fd, 1, os.getpid()]
        return path


def _release(path: Path) -> None:
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is None or held[2] != os.getpid():  # not ours (e.g. a forked child inherited the table)
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[path]
        # Removed while still locked, so that no one can lock the file between our unlink and our close (a
        # process that opened it before the unlink sees that the path names another file and retries).
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(held[0])


def _is_main_process() -> bool:
    """Whether this is the main process of its run (torchrun / accelerate / DeepSpeed launchers set RANK): the
    other processes of a multi-process run write under the main process's lock, never their own."""
    return os.environ.get("RANK", "0") in ("", "0")


# The `output_dirs_held` blocks open in this process, innermost last: the locks `check_output_dir` took in each.
_HOLD_STACK: list[list["OutputDirLock"]] = []


@contextlib.contextmanager
def output_dirs_held() -> Iterator[None]:
    """Within this block, every output folder `check_output_dir` accepts stays locked until the block ends (the
    `hf-moe` command line runs each command in one), so that a converter holds its folder from its first check,
    before any work, rather than only while it writes; outside, `check_output_dir` only checks the lock."""
    holds: list[OutputDirLock] = []
    _HOLD_STACK.append(holds)
    try:
        yield
    finally:
        _HOLD_STACK.remove(holds)
        for lock in reversed(holds):
            lock.release()


def check_not_locked(output_dir: str | Path) -> None:
    """Raise `OutputFolderLocked` if another process holds the lock of `output_dir` (without taking it)."""
    output_dir = Path(output_dir).expanduser().resolve()
    path = lock_path(output_dir)
    with _HELD_GUARD:
        if path in _HELD and _HELD[path][2] == os.getpid():
            return
        try:
            # Read-write: on NFS an exclusive flock needs a descriptor open for writing.
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except (FileNotFoundError, PermissionError):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _locked_error(output_dir, path, _read_holder(fd, wait=1.0)) from None
        finally:
            os.close(fd)  # also releases the probe's lock


class OutputDirLock:
    """The exclusive lock of an output folder, held between `acquire()` and `release()` (or as a context manager).

    A second process asking for it gets `OutputFolderLocked` at once, naming the holder (process id, host, command,
    start time); the kernel releases it when the holding process ends, however it ends, and the next run takes it
    over with a warning. Within one process it is re-entrant: nested holds of one folder share one lock. A lock
    acquired and never released is released when the object is garbage-collected or the interpreter exits.
    Works on local file systems and on NFS (where `flock` is an NFS lock).
    """

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir).expanduser().resolve()
        self._finalizer = None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def acquire(self) -> "OutputDirLock":
        if not self.held:
            path = _acquire(self.output_dir)
            self._finalizer = weakref.finalize(self, _release, path)
        return self

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_output_dir(output_dir: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse, before any work is done, an output folder that already holds files (unless `overwrite`), an
    output folder that is, or holds, one of the command's `inputs` (which writing it would delete), and one that
    another run is writing (`OutputFolderLocked`). Inputs that are not local paths (Hub ids) are ignored."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"Output path {output_dir} exists and is not a folder.")
    if _is_main_process():
        if _HOLD_STACK:
            _HOLD_STACK[-1].append(OutputDirLock(output_dir).acquire())
        else:
            check_not_locked(output_dir)
    resolved = output_dir.expanduser().resolve()
    for item in inputs:
        if item is None or not Path(item).expanduser().exists():
            continue
        source = Path(item).expanduser().resolve()
        if _contains(resolved, source):
            where = "is" if source == resolved else "holds"
            raise ValueError(
                f"Output folder {output_dir} {where} the input '{item}': writing it would destroy that input. "
                "Choose another --output_dir."
            )
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output folder {output_dir} is not empty; pass overwrite=True (--overwrite) to replace it."
        )
    return output_dir


@contextlib.contextmanager
def atomic_output_dir(
    output_dir: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """Yield a temporary folder next to `output_dir`; on success it replaces `output_dir`, on error it is removed.

    `inputs` are checked as by `check_output_dir`. Stale temporaries of earlier killed writes are removed first.
    The folder's lock (`OutputDirLock`) is held from the checks to the rename: a concurrent writer is refused.
    """
    with OutputDirLock(output_dir):
        with _atomic_output_dir(output_dir, overwrite, inputs) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_output_dir(output_dir: str | Path, overwrite: bool, inputs: Iterable[str | Path | None]) -> Iterator[Path]:
    output_dir = check_output_dir(output_dir, overwrite, inputs).expanduser().resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    tmp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(output_dir, "tmp"), dir=output_dir.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's private 0700 would otherwise become the output folder's mode
    try:
        yield tmp
        if output_dir.exists():
            # Moved aside rather than deleted first, so that a kill between the two renames leaves the
            # previous output (recognisable as stale) instead of nothing.
            old = Path(tempfile.mkdtemp(prefix=_sibling_prefix(output_dir, "old"), dir=output_dir.parent))
            old.rmdir()
            output_dir.rename(old)
            tmp.rename(output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    Readers therefore see either the previous file or the complete new one, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=_sibling_prefix(path, "tmp"), dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())  # as a file opened for writing gets, not mkstemp's private 0600
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
