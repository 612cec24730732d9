"""The package layout's rules, checked on the source: the model code is self-contained, shared modules never
import a family, families never import each other, and `hf-moe --help` imports neither torch nor transformers."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
# A family is a subpackage contributing commands to `hf-moe`; other subpackages (metrics, class names) are shared.
FAMILIES = sorted(p.parent.name for p in (ROOT / "hf_moe").glob("*/commands.py"))


def imported_modules(path: Path, module_name: str) -> set[str]:
    """Absolute names of the modules `path` (the module `module_name`) imports, relative imports resolved."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module_name.split(".")
                base = parts[: len(parts) - node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_families_are_found():
    assert "clip_moe" in FAMILIES


def test_model_code_imports_only_torch_transformers_and_siblings():
    for path in (ROOT / "modeling").glob("*.py"):
        if path.name == "__init__.py":  # the package's init, not shipped to the Hub
            continue
        for module in imported_modules(path, f"hf_moe.modeling.{path.stem}"):
            top = module.split(".")[0]
            assert top != "hf_moe" or module.startswith("hf_moe.modeling."), f"{path.name} imports {module}"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_imports_no_other_family(family):
    others = [f"hf_moe.{name}" for name in FAMILIES if name != family]
    for path in (ROOT / "hf_moe" / family).rglob("*.py"):
        for module in imported_modules(path, f"hf_moe.{family}.{path.stem}"):
            assert not any(module == o or module.startswith(o + ".") for o in others), f"{path} imports {module}"


def test_shared_modules_import_no_family():
    families = [f"hf_moe.{name}" for name in FAMILIES]
    for path in (ROOT / "hf_moe").glob("*.py"):
        if path.name == "cli.py":  # assembles the families' command tables, by design
            continue
        for module in imported_modules(path, f"hf_moe.{path.stem}"):
            assert not any(module == f or module.startswith(f + ".") for f in families), f"{path.name} imports {module}"


def test_help_imports_neither_torch_nor_transformers():
    script = (
        "import sys, io, contextlib\n"
        "from hf_moe.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    assert main(['--help']) == 0\n"
        "assert 'upcycle-clip' in out.getvalue() and 'eval' in out.getvalue(), out.getvalue()\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_model_classes_load_lazily_and_register_auto_classes():
    script = (
        "import sys\n"
        "import hf_moe\n"
        "assert 'torch' not in sys.modules\n"
        "from transformers import AutoConfig\n"
        "config = hf_moe.CLIPMoEConfig()\n"
        "assert type(AutoConfig.for_model('clip_moe')) is hf_moe.CLIPMoEConfig\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_architecture_page_names_every_module():
    """docs/ARCHITECTURE.md, the page a newcomer reads first, names every module of the package, so it cannot fall
    behind the code: a family's module by its family folder (`mode/cluster.py`), the others by file name."""
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = []
    for folder in ("hf_moe", "conversion", "modeling"):
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT / folder)
            if path.name == "__init__.py" and relative.parent != Path("."):
                continue  # a sub-package's init: the package is named
            if relative.parts[0] in FAMILIES and path.name in ("commands.py", "demo.py", "__init__.py"):
                continue  # every family has them: the page says so once
            if relative.parts[0] == "metrics":
                continue  # metric scripts: `metrics/` is named
            name = relative.as_posix() if relative.parts[0] in FAMILIES else path.name
            if f"`{name}`" not in page and not re.search(rf"`[^`]*\b{re.escape(name)}\b[^`]*`", page):
                missing.append(f"{folder}/{relative.as_posix()}")
    assert not missing, f"docs/ARCHITECTURE.md does not name: {missing}"
