"""Evaluation suites (`hf-moe eval suite`): the shipped suite files (parse, provenance, class-name counts, templates),
the reader's one-line errors, and a two-task suite on local save_to_disk and parquet data sets whose JSON / CSV /
table and model-card entries equal the single-task `hf-moe eval zero-shot` results on the same data."""

import csv
import json
import shutil
import textwrap

import pytest
import yaml

from hf_moe.class_names import load_class_names
from hf_moe.eval_suites import (
    SUITES_DIR,
    SuiteError,
    available_suites,
    format_table,
    read_suite,
    resolve_task_class_names,
)
from hf_moe.evaluation import TEMPLATE_SETS


# ---------------------------------------------------------------- the shipped suites

EXPECTED_CLASSES = {
    "ta8": {
        "sun397": 397,
        "stanford_cars": 196,
        "resisc45": 45,
        "eurosat": 10,
        "svhn": 10,
        "gtsrb": 43,
        "mnist": 10,
        "dtd": 47,
    },
    "clip_moe": {"imagenet": 1000, "cifar10": 10, "cifar100": 100},
}


def class_count(task):
    names = task.class_names
    return len(load_class_names(names)) if isinstance(names, str) else len(names)


def test_shipped_suites_are_found_by_name_and_shipped_as_package_data():
    assert {"ta8", "clip_moe"} <= set(available_suites())
    from pathlib import Path

    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert '"hf_moe": ["suites/*.yaml"]' in setup


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_shipped_suite_parses_with_sources_counts_and_templates(name):
    suite = read_suite(name)
    assert suite.name == name and suite.source and suite.description
    raw = yaml.safe_load((SUITES_DIR / f"{name}.yaml").read_text())
    zero_shot = {task.name: task for task in suite.tasks if task.task == "zero-shot"}
    assert {task: class_count(zero_shot[task]) for task in zero_shot} == EXPECTED_CLASSES[name]
    for task, entry in zip(suite.tasks, raw["tasks"]):
        assert isinstance(entry.get("source"), str) and len(entry["source"]) > 40, task.name
        assert not task.local, f"{task.name}: a shipped suite names Hub datasets"
        if task.task == "zero-shot":
            templates = TEMPLATE_SETS[task.templates] if isinstance(task.templates, str) else task.templates
            assert templates and all(template.count("{}") == 1 for template in templates), task.name
            names = load_class_names(task.class_names) if isinstance(task.class_names, str) else task.class_names
            assert len(set(names)) == len(names) or task.name == "imagenet", f"{task.name}: duplicate class names"


def test_ta8_entries_follow_fusion_bench_and_clip():
    tasks = {task.name: task for task in read_suite("ta8").tasks}
    assert [task for task in tasks] == ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    assert all(task.split == "test" and task.metric == "top1" for task in tasks.values())
    assert tasks["svhn"].data == "ufldl-stanford/svhn" and tasks["svhn"].config == "cropped_digits"
    # EuroSAT: CLIP's descriptive names in the dataset's (alphabetical folder) order, not prompts.md's order.
    assert tasks["eurosat"].class_names[:3] == ["annual crop land", "forest", "brushland or shrubland"]
    assert tasks["eurosat"].class_names[-1] == "lake or sea"
    assert tasks["svhn"].templates == tasks["mnist"].templates == ['a photo of the number: "{}".']
    assert tasks["sun397"].class_names[0] == "abbey" and tasks["sun397"].class_names[-1] == "youth hostel"
    assert len(tasks["resisc45"].templates) == 18 and len(tasks["stanford_cars"].templates) == 8


def test_clip_moe_suite_follows_the_clip_moe_scripts():
    tasks = {task.name: task for task in read_suite("clip_moe").tasks}
    assert [task.task for task in tasks.values()] == ["zero-shot"] * 3 + ["retrieval"] * 2
    assert all(tasks[name].templates == "imagenet" for name in ("imagenet", "cifar10", "cifar100"))
    # torchvision's CIFAR-100 names: CLIP's with underscores for the two-word names.
    clip_names = load_class_names("cifar100")
    assert tasks["cifar100"].class_names == [name.replace(" ", "_") for name in clip_names]
    assert "aquarium_fish" in tasks["cifar100"].class_names and "crab" in tasks["cifar100"].class_names
    assert tasks["cifar100"].label_column == "fine_label" and tasks["cifar100"].image_column == "img"
    assert (tasks["coco"].data, tasks["coco"].split, tasks["coco"].caption_column) == (
        "lmms-lab/COCO-Caption2017",
        "val",
        "answer",
    )
    assert tasks["flickr30k"].filters is None  # every Flickr30k image, as the CLIP-MoE script reads the token file


# ---------------------------------------------------------------- reader errors


def write_suite(tmp_path, body: str, name="suite.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


BASE_TASK = """\
    name: s
    tasks:
      - name: a
        data: {data}
        class_names: [x, y]
        templates: ["a photo of a {{}}."]
"""


@pytest.mark.parametrize(
    "extra, key",
    [
        ("        colour: red\n", "colour"),
        ("        metric: top5\n", "metric"),
        ("        task: detection\n", "task"),
        ("        caption_column: text\n", "caption_column"),
        ("        filters: [1, 2]\n", "filters"),
    ],
)
def test_reader_errors_name_the_file_task_and_key(tmp_path, extra, key):
    path = write_suite(tmp_path, BASE_TASK.format(data="org/data") + extra)
    with pytest.raises(SuiteError) as err:
        read_suite(path)
    message = str(err.value)
    assert str(path) in message and "task 'a'" in message and f"key '{key}'" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "templates", ['["a photo of a thing."]', '["{} and {}"]', "fancy", "[]"], ids=["none", "two", "unknown", "empty"]
)
def test_templates_need_exactly_one_placeholder_or_a_named_set(tmp_path, templates):
    body = BASE_TASK.format(data="org/data").replace('["a photo of a {}."]', templates)
    with pytest.raises(SuiteError, match=r"task 'a': key 'templates'"):
        read_suite(write_suite(tmp_path, body))


def test_missing_data_unknown_suite_key_duplicate_names_and_unknown_suite(tmp_path):
    no_data = "name: s\ntasks:\n  - name: a\n    class_names: feature\n"
    with pytest.raises(SuiteError, match=r"task 'a': key 'data': missing"):
        read_suite(write_suite(tmp_path, no_data))
    with pytest.raises(SuiteError, match=r"unknown key 'task'"):
        read_suite(write_suite(tmp_path, "name: s\ntask: []\ntasks: []\n", "b.yaml"))
    twice = "name: s\ntasks:\n  - {name: a, data: x/y}\n  - {name: a, data: x/z}\n"
    with pytest.raises(SuiteError, match=r"task 'a': key 'name'"):
        read_suite(write_suite(tmp_path, twice, "c.yaml"))
    with pytest.raises(SuiteError, match=r"neither a shipped suite \(clip_moe, ta8"):
        read_suite(tmp_path / "missing.yaml")
    with pytest.raises(SuiteError, match=r"task 'a': key 'class_names'"):
        read_suite(write_suite(tmp_path, "tasks:\n  - {name: a, data: x/y, class_names: fruits}\n", "d.yaml"))


def test_paths_are_relative_to_the_suite_file(tmp_path):
    (tmp_path / "sub" / "data").mkdir(parents=True)
    path = write_suite(tmp_path / "sub", BASE_TASK.format(data="data"))
    task = read_suite(path).tasks[0]
    assert task.local and task.data == str((tmp_path / "sub" / "data").resolve())
    task = read_suite(write_suite(tmp_path, BASE_TASK.format(data="org/hub-data"), "hub.yaml")).tasks[0]
    assert not task.local and task.data == "org/hub-data"


def test_class_names_are_checked_against_the_classlabel(tmp_path):
    import datasets

    features = datasets.Features({"label": datasets.ClassLabel(names=["cat", "dog", "red_fox"])})
    data = datasets.Dataset.from_dict({"label": [0, 1, 2]}, features=features)
    task = read_suite(write_suite(tmp_path, BASE_TASK.format(data="org/d"))).tasks[0]
    with pytest.raises(SuiteError, match=r"task 'a': key 'class_names': 2 class names, but .* has 3 classes"):
        resolve_task_class_names(task, data, tmp_path / "suite.yaml")
    task.class_names = ["dog", "cat", "red fox"]
    with pytest.raises(SuiteError, match=r"in another order \(label 0 is 'cat'"):
        resolve_task_class_names(task, data)
    task.class_names = "feature"
    assert resolve_task_class_names(task, data) == ["cat", "dog", "red_fox"]
    plain = datasets.Dataset.from_dict({"label": [0, 4]})
    task.class_names = ["a", "b", "c"]
    with pytest.raises(SuiteError, match=r"label id 4"):
        resolve_task_class_names(task, plain)
    task.class_names = "feature"
    with pytest.raises(SuiteError, match=r"not a ClassLabel"):
        resolve_task_class_names(task, plain)


def test_format_table():
    rows = [{"task": "a", "metric": "top1", "score": 0.5, "num_images": 10},
            {"task": "bb", "metric": "mean_per_class", "score": 0.25, "num_images": 7}]  # fmt: skip
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["task", "metric", "score", "images"]
    assert lines[2].split() == ["a", "top1", "0.5000", "10"] and lines[3].split() == ["bb", "mean_per_class", "0.2500", "7"]
