"""The README's demo figures are what `hf-moe demo` prints.

Each family's demo section in README.md holds a block introduced by "`hf-moe demo --family NAME` prints" whose
lines are lines of that demo's output, verbatim (indentation aside). The demos are deterministic (seeded, one torch
thread: see `hf_moe.experiments.quiet_tiny_run`), so the figures do not move between runs or with the machine's
core count. The demo tests (test_demo.py, test_we_moe_demo.py, test_moiie_demo.py) already run each demo once at
its defaults; they pass what it printed to `assert_readme_shows`, so no demo runs twice. The tests here check the
README side. When a change moves a demo's figures, rewrite its block from the demo's output:

    hf-moe demo --family moiie | tee moiie.log && python tests/test_demo_figures.py moiie moiie.log
"""

import re
from pathlib import Path

import pytest


README = Path(__file__).resolve().parents[1] / "README.md"
# The lines of each demo's output that carry its figures, which the README quotes, in order (MoDE's test runs a
# shortened demo, so the README carries no MoDE demo figures).
FIGURE_LINES = {
    "clip_moe": [
        r"untrained: zero-shot",
        r"dense CLIP: zero-shot",
        r"CLIP-MoE: +zero-shot",
        r"accuracy \d\.\d+; the same prediction",
    ],
    "we_moe": [
        r"(pretrained|task arithmetic|fine-tune \(own task\)|WEMoE \(before TTA\)|WEMoE \+ TTA) +digits",
        r"a \w+ image's routing weights",
    ],
    "moiie": [r"accuracy 'what digit", r"digit \d+: '", r"\d+/\d+ right"],
}
FAMILIES_WITH_FIGURES = tuple(FIGURE_LINES)
# From "`hf-moe demo --family NAME` prints" to the first fence after it, which must be a ```text one.
BLOCK = r"(`hf-moe demo --family {}`\s+prints(?:(?!```).)*?:\s*\n```text\n)(.*?)(\n```)"


def _block(family: str, readme: str) -> re.Match:
    blocks = list(re.finditer(BLOCK.format(re.escape(family)), readme, flags=re.DOTALL))
    if len(blocks) != 1:
        raise AssertionError(
            f"README.md must hold exactly one '`hf-moe demo --family {family}` prints ...:' block followed by a "
            f"```text fence; found {len(blocks)}."
        )
    return blocks[0]


def readme_demo_lines(family: str, readme: str | None = None) -> list[str]:
    """The lines of the README's "`hf-moe demo --family FAMILY` prints ...:" block (a ```text fence)."""
    readme = README.read_text() if readme is None else readme
    return [line.strip() for line in _block(family, readme).group(2).splitlines() if line.strip()]


def figure_lines(family: str, printed: str) -> list[str]:
    """The lines of the demo's output `printed` that carry its figures (`FIGURE_LINES`), in order."""
    return [
        line.strip()
        for line in printed.splitlines()
        if any(re.match(pattern, line.strip()) for pattern in FIGURE_LINES[family])
    ]


def readme_with_figures(family: str, printed: str, readme: str) -> str:
    """`readme` with its `family` block replaced by the figure lines of `printed`."""
    block = _block(family, readme)
    body = "\n".join("   " + line for line in figure_lines(family, printed))
    return readme[: block.start(2)] + body + readme[block.end(2) :]


def assert_readme_shows(family: str, printed: str, readme: str | None = None) -> None:
    """Called by each demo test with the demo's stdout: the README quotes exactly its figure lines."""
    quoted, expected = readme_demo_lines(family, readme), figure_lines(family, printed)
    assert quoted == expected, (
        f"README.md's `hf-moe demo --family {family}` block is not what the demo printed. The demo's figure lines:\n"
        + "\n".join(expected)
        + f"\n\nTo update the README: hf-moe demo --family {family} | tee {family}.log; "
        f"python tests/test_demo_figures.py {family} {family}.log"
    )


@pytest.mark.parametrize("family", FAMILIES_WITH_FIGURES)
def test_readme_quotes_figures_for_each_demo(family):
    lines = readme_demo_lines(family)
    assert lines
    # The block quotes figures (accuracies), not only prose.
    assert any(re.search(r"\d\.\d{3}", line) for line in lines)


SAMPLE_OUTPUT = """1. A small dense CLIP ...
   untrained: zero-shot accuracy 0.101 held out (chance 0.1)
   after 600 steps -> /tmp/x/dense-clip: zero-shot 0.774, R@1 image->text 0.440, text->image 0.440
4. On 297 held-out digits (84 distinct captions for retrieval):
   dense CLIP: zero-shot 0.774, R@1 image->text 0.440, text->image 0.440
   CLIP-MoE:   zero-shot 0.771, R@1 image->text 0.488, text->image 0.464
   accuracy 0.771; the same prediction as in-process for 297/297 digits
Done in 60 s.
"""


def test_a_changed_figure_is_caught_and_the_block_can_be_rewritten():
    readme = "Intro.\n`hf-moe demo --family clip_moe` prints (seed 0):\n\n```text\n   dense CLIP: zero-shot 0.781\n"
    readme += "```\nEnd.\n"
    with pytest.raises(AssertionError, match="not what the demo printed"):
        assert_readme_shows("clip_moe", SAMPLE_OUTPUT, readme)
    updated = readme_with_figures("clip_moe", SAMPLE_OUTPUT, readme)
    assert_readme_shows("clip_moe", SAMPLE_OUTPUT, updated)
    assert readme_demo_lines("clip_moe", updated) == [
        "untrained: zero-shot accuracy 0.101 held out (chance 0.1)",
        "dense CLIP: zero-shot 0.774, R@1 image->text 0.440, text->image 0.440",
        "CLIP-MoE:   zero-shot 0.771, R@1 image->text 0.488, text->image 0.464",
        "accuracy 0.771; the same prediction as in-process for 297/297 digits",
    ]
    assert updated.startswith("Intro.\n") and updated.endswith("\n```\nEnd.\n")
    with pytest.raises(AssertionError, match="exactly one"):
        readme_demo_lines("we_moe", readme)


if __name__ == "__main__":
    # python tests/test_demo_figures.py FAMILY OUTPUT: rewrite the README's FAMILY block from a saved demo output.
    import sys

    family, output = sys.argv[1:]
    README.write_text(readme_with_figures(family, Path(output).read_text(), README.read_text()))
    print("\n".join(readme_demo_lines(family)))
