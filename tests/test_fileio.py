"""Atomic output folders and files: inputs are never deleted, and killed writers leave nothing behind for long."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from hf_moe.fileio import atomic_output_dir, atomic_output_file, check_output_dir


def hidden_siblings(folder):
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


@pytest.mark.parametrize("input_inside", [False, True], ids=["output_is_input", "input_inside_output"])
def test_overwrite_refuses_an_output_folder_holding_an_input(tmp_path, input_inside):
    output = tmp_path / "out"
    source = output / "base" if input_inside else output
    source.mkdir(parents=True)
    (source / "config.json").write_text("{}")

    with pytest.raises(ValueError, match="would destroy that input"):
        check_output_dir(output, overwrite=True, inputs=["some/hub-id", None, source])
    with pytest.raises(ValueError, match="would destroy that input"):
        with atomic_output_dir(output, overwrite=True, inputs=[str(source)]):
            pytest.fail("the body must not run")
    assert (source / "config.json").read_text() == "{}"


def test_check_output_dir_accepts_unrelated_inputs_and_hub_ids(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    assert check_output_dir(tmp_path / "out", overwrite=True, inputs=[tmp_path / "base", "openai/clip"]).name == "out"
    with pytest.raises(FileExistsError, match="not empty"):
        check_output_dir(tmp_path / "out", overwrite=False)


def test_overwrite_replaces_the_folder_and_leaves_no_sibling(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    with atomic_output_dir(output, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(path.name for path in output.iterdir()) == ["new.txt"]
    assert hidden_siblings(tmp_path) == []


def test_failed_write_keeps_the_previous_output(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(output, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert (output / "old.txt").read_text() == "old"
    assert hidden_siblings(tmp_path) == []


WRITER = """
import sys, time
from hf_moe.fileio import {function}
with {function}(sys.argv[1]) as tmp:
    {write}
    print("writing", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize(
    "function, write",
    [
        ("atomic_output_dir", "(tmp / 'model.bin').write_bytes(b'0' * 4096)"),
        ("atomic_output_file", "tmp.write_text('x')"),
    ],
)
def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path, function, write):
    target = tmp_path / "out"
    script = textwrap.dedent(WRITER.format(function=function, write=write))
    writer = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    left = hidden_siblings(tmp_path)
    if function == "atomic_output_dir":  # the folder's lock too: taken over and removed by the next write
        assert ".out.lock" in left
        left.remove(".out.lock")
    assert len(left) == 1 and left[0].startswith(".out.tmp-")  # SIGKILL runs no cleanup

    # A live writer's temporary (this process) and another target's are not touched.
    live = tmp_path / f"{left[0].rsplit('-', 2)[0]}-{os.getpid()}-live"
    live.mkdir()
    other = tmp_path / left[0].replace(".out.", ".other.", 1)
    other.mkdir()

    if function == "atomic_output_dir":
        with atomic_output_dir(target) as tmp:
            (tmp / "model.bin").write_bytes(b"1")
    else:
        with atomic_output_file(target) as tmp:
            tmp.write_text("y")
    assert hidden_siblings(tmp_path) == sorted([live.name, other.name])
    assert target.exists()


def test_atomic_outputs_get_the_modes_of_ordinary_writes(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "folder") as tmp:
            (tmp / "a.txt").write_text("a")
        with atomic_output_file(tmp_path / "file.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "file.json").stat().st_mode & 0o777 == 0o644
