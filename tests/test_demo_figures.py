"""The README's demo figures are what `hf-moe demo` prints.

Each family's demo section in README.md holds a block introduced by "`hf-moe demo --family NAME` prints" whose
lines are lines of that demo's output, verbatim (indentation aside). The demos are deterministic (seeded, one torch
thread: see `hf_moe.experiments.quiet_tiny_run`), so the figures do not move between runs or with the machine's
core count. The demo tests (test_demo.py, test_we_moe_demo.py, test_moiie_demo.py) already run each demo once at
its defaults; they pass what it printed to `assert_readme_shows`, so no demo runs twice. The tests here check the
README side.
"""

import re
from pathlib import Path

import pytest


README = Path(__file__).resolve().parents[1] / "README.md"
# The families whose demo the suite runs at its defaults (MoDE's test runs a shortened demo, so the README carries no
# MoDE demo figures).
FAMILIES_WITH_FIGURES = ("clip_moe", "we_moe", "moiie")


def readme_demo_lines(family: str, readme: str | None = None) -> list[str]:
    """The lines of the README's "`hf-moe demo --family FAMILY` prints ...:" block (a ```text fence)."""
    readme = README.read_text() if readme is None else readme
    # From "prints" to the first fence after it, which must be a ```text one.
    pattern = rf"`hf-moe demo --family {re.escape(family)}`\s+prints(?:(?!```).)*?:\s*\n```text\n(.*?)\n```"
    blocks = re.findall(pattern, readme, flags=re.DOTALL)
    if len(blocks) != 1:
        raise AssertionError(
            f"README.md must hold exactly one '`hf-moe demo --family {family}` prints ...:' block followed by a "
            f"```text fence; found {len(blocks)}."
        )
    return [line.strip() for line in blocks[0].splitlines() if line.strip()]


def missing_from_output(family: str, printed: str, readme: str | None = None) -> list[str]:
    """The README's demo lines for `family` that the demo's output `printed` does not hold as a whole line (leading
    and trailing blanks aside)."""
    printed_lines = {line.strip() for line in printed.splitlines()}
    return [line for line in readme_demo_lines(family, readme) if line not in printed_lines]


def assert_readme_shows(family: str, printed: str) -> None:
    """Called by each demo test with the demo's stdout: every line the README quotes was printed."""
    missing = missing_from_output(family, printed)
    assert not missing, (
        f"README.md's `hf-moe demo --family {family}` lines differ from what the demo printed. Not printed:\n"
        + "\n".join(missing)
        + "\n\nPrinted:\n"
        + printed
    )


@pytest.mark.parametrize("family", FAMILIES_WITH_FIGURES)
def test_readme_quotes_figures_for_each_demo(family):
    lines = readme_demo_lines(family)
    assert lines
    # The block quotes figures (accuracies), not only prose.
    assert any(re.search(r"\d\.\d{3}", line) for line in lines)


def test_a_changed_figure_is_caught():
    readme = "`hf-moe demo --family clip_moe` prints (seed 0):\n\n```text\n   dense CLIP: zero-shot 0.781\n```\n"
    assert missing_from_output("clip_moe", "1. ...\n   dense CLIP: zero-shot 0.781\n", readme) == []
    wrong = missing_from_output("clip_moe", "   dense CLIP: zero-shot 0.774\n", readme)
    assert wrong == ["dense CLIP: zero-shot 0.781"]
    with pytest.raises(AssertionError, match="exactly one"):
        readme_demo_lines("we_moe", readme)
