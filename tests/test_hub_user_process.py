"""`hf_moe.experiments.run_as_hub_user`, the demos' reload step: its fresh interpreter cannot import hf_moe (the
lines the tests' fresh processes open with too), it hands back the JSON object its script prints, and a failure names
the folder and carries the child's error."""

import textwrap

import pytest

from hf_moe.experiments import run_as_hub_user

from helpers import BLOCK_HF_MOE


SCRIPT = textwrap.dedent(
    """
    import json
    try:
        import hf_moe.modeling
        blocked = None
    except ImportError as error:
        blocked = str(error)
    print("progress lines come first")
    print(json.dumps({"blocked": blocked, "argv": sys.argv[1:]}))
    """
)


def test_the_child_cannot_import_hf_moe_and_its_json_comes_back():
    result = run_as_hub_user(SCRIPT, ["folder", 3], "folder")
    assert result == {"blocked": "hf_moe is not installed for this user", "argv": ["folder", "3"]}


def test_a_failure_names_the_folder_and_the_childs_error():
    with pytest.raises(RuntimeError, match=r"Loading some/model without hf_moe failed:\n(.|\n)*ZeroDivisionError"):
        run_as_hub_user("1 / 0", [], "some/model")


def test_the_tests_fresh_processes_use_the_same_block():
    from hf_moe import experiments

    assert BLOCK_HF_MOE is experiments.BLOCK_HF_MOE
