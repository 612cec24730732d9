"""Writing output folders and files atomically: everything goes to a temporary sibling that is renamed into
place only once complete, so a failed or interrupted run never leaves a half-written model behind.

A process killed with SIGKILL (or by the OOM killer, or a lost node) runs no cleanup, so its temporary sibling
would stay forever, as large as the model. Temporary names therefore carry the writer's host and pid
(`.NAME.tmp-HOST-PID-RANDOM`); the next write to the same target removes those whose writer is gone.
"""

import contextlib
import os
import re
import shutil
import socket
import tempfile
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


def check_output_dir(output_dir: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse, before any work is done, an output folder that already holds files (unless `overwrite`), and an
    output folder that is, or holds, one of the command's `inputs` (which writing it would delete). Inputs that
    are not local paths (Hub ids) are ignored."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"Output path {output_dir} exists and is not a folder.")
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
    """
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
