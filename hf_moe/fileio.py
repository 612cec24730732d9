"""Writing output folders atomically: everything goes to a temporary sibling folder that is renamed into
place only once complete, so a failed or interrupted run never leaves a half-written model behind."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_output_dir(output_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work is done, an output folder that already holds files (unless `overwrite`)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"Output path {output_dir} exists and is not a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output folder {output_dir} is not empty; pass overwrite=True (--overwrite) to replace it."
        )
    return output_dir


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `output_dir`; on success it replaces `output_dir`, on error it is removed."""
    output_dir = check_output_dir(output_dir, overwrite).resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        yield tmp
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    Readers therefore see either the previous file or the complete new one, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
