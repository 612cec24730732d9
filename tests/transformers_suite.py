"""transformers' own generic model tests (`ModelTesterMixin`, `ConfigTester`, ...) for hf-moe's classes.

They live in transformers' source distribution, not in its wheel, and none of their code is committed here: the
first use fetches the sdist of the INSTALLED transformers (`pip download --no-deps --no-binary :all:
transformers==X`), extracts its `tests/` into a cache outside the repository (`~/.cache/hf-moe/transformers-tests/X`,
or `$HF_MOE_TRANSFORMERS_TESTS_CACHE`) as the package `transformers_sdist_tests`, and imports the mixins from there.
`.ci/run` runs the fetch before the suite (`python tests/transformers_suite.py`).

The sdist lacks three modules `test_modeling_common` / `test_configuration_common` import (the export and generation
testers, the common config kwargs); `tests/transformers_stand_ins/` holds hf-moe's own small stand-ins, installed at
those module paths.
"""

import contextlib
import fcntl
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest
from pathlib import Path

import transformers


# The suite runs hf-moe's classes and transformers' own classes (the controls, so that a tester artefact shows as
# such) with their fp32 cases; `HF_MOE_TRANSFORMERS_TESTS=full` adds the half-precision cases and the second decoder
# family of MoIIE (time on 2 CPU cores: they would take the suite from ~1.5 to ~5 minutes of CPU).
FULL = os.environ.get("HF_MOE_TRANSFORMERS_TESTS") == "full"
FULL_ONLY = "runs with HF_MOE_TRANSFORMERS_TESTS=full (time on 2 CPU cores)"

CLIP_GC_REASON = (
    "transformers skips it for CLIP: This architecture seem to not compute gradients properly when using GC, check: "
    "https://github.com/huggingface/transformers/pull/27124"
)


class CLIPTrainingSkips:
    """The training tests transformers' CLIP testers skip, with their reasons: put before `ModelTesterMixin`."""

    @unittest.skip(reason="transformers skips test_training for CLIP")
    def test_training(self):
        pass

    @unittest.skip(reason="transformers skips test_training_gradient_checkpointing for CLIP")
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip(reason=CLIP_GC_REASON)
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass

    @unittest.skip(reason=CLIP_GC_REASON)
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass


class CLIPJointSkips:
    """The tests transformers' joint CLIPModel tester skips, with its reasons: put before `ModelTesterMixin`."""

    @unittest.skip(reason="Hidden_states is tested in individual model tests")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="Inputs_embeds is tested in individual model tests")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="Retain_grad is tested in individual model tests")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip(reason="CLIPModel does not have input/output embeddings")
    def test_model_get_set_embeddings(self):
        pass


PACKAGE = "transformers_sdist_tests"
STAND_INS = {
    # module path inside the tests package -> our stand-in file
    "exporters/test_export.py": "export_tester.py",
    "generation/test_utils.py": "generation_tester.py",
    "utils/test_configuration_utils.py": "configuration_kwargs.py",
}


def cache_root() -> Path:
    root = os.environ.get("HF_MOE_TRANSFORMERS_TESTS_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "hf-moe" / "transformers-tests"
    return base / transformers.__version__


def _fetch(root: Path) -> None:
    """Download and extract the sdist's tests/ into `root / PACKAGE` (atomically: a temporary sibling renamed)."""
    version = transformers.__version__
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "--dest", tmp,
             f"transformers=={version}"],
            check=True,
        )  # fmt: skip
        (archive,) = Path(tmp).glob("transformers-*.tar.gz")
        prefix = f"transformers-{version}/tests/"
        target = Path(tmp) / PACKAGE
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.name.startswith(prefix) and member.isfile() and member.name.count("/") == 2:
                    member.name = member.name[len(prefix) :]
                    tar.extract(member, target, filter="data")
        if not (target / "test_modeling_common.py").is_file():
            raise RuntimeError(f"The transformers {version} sdist holds no tests/test_modeling_common.py")
        (target / "__init__.py").touch()
        shutil.rmtree(root / PACKAGE, ignore_errors=True)
        target.rename(root / PACKAGE)


def _install_stand_ins(package: Path) -> None:
    here = Path(__file__).with_name("transformers_stand_ins")
    for module, stand_in in STAND_INS.items():
        path = package / module
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        source = (here / stand_in).read_text()
        if not path.is_file() or path.read_text() != source:
            path.write_text(source)


def transformers_tests() -> Path:
    """The cached tests package of the installed transformers (fetched on first use), importable as
    `transformers_sdist_tests`; returns its folder."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:  # one fetch at a time (pytest-xdist workers, concurrent runs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / PACKAGE / "test_modeling_common.py").is_file():
            _fetch(root)
        _install_stand_ins(root / PACKAGE)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root / PACKAGE


def import_common(module: str):
    """`transformers_sdist_tests.<module>` (e.g. "test_modeling_common"), fetched on first use."""
    transformers_tests()
    with contextlib.suppress(KeyError):
        return sys.modules[f"{PACKAGE}.{module}"]
    return importlib.import_module(f"{PACKAGE}.{module}")


if __name__ == "__main__":
    print(f"transformers {transformers.__version__} tests in {transformers_tests()}")
