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
        assert "{" not in entry["source"], f"{task.name}: an unfilled placeholder in its source"
        assert not task.local, f"{task.name}: a shipped suite names Hub datasets"
        if task.task == "zero-shot":
            templates = TEMPLATE_SETS[task.templates] if isinstance(task.templates, str) else task.templates
            assert templates and all(template.count("{}") == 1 for template in templates), task.name
            names = load_class_names(task.class_names) if isinstance(task.class_names, str) else task.class_names
            assert len(set(names)) == len(names) or task.name == "imagenet", f"{task.name}: duplicate class names"


def test_ta8_entries_follow_fusion_bench_and_clip():
    tasks = {task.name: task for task in read_suite("ta8").tasks}
    assert [task for task in tasks] == [
        "sun397",
        "stanford_cars",
        "resisc45",
        "eurosat",
        "svhn",
        "gtsrb",
        "mnist",
        "dtd",
    ]
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
    assert lines[2].split() == ["a", "top1", "0.5000", "10"] and lines[3].split() == [
        "bb",
        "mean_per_class",
        "0.2500",
        "7",
    ]


# ---------------------------------------------------------------- a two-task suite end to end


@pytest.fixture(scope="module")
def suite_model(tmp_path_factory):
    """A toy CLIP-MoE with a model card, its weights scaled up so that predictions spread over several classes."""
    import torch
    from transformers import AutoProcessor, CLIPModel

    from hf_moe.conversion import upcycle_clip
    from hf_moe.toy import save_toy_clip, toy_clip_config

    root = tmp_path_factory.mktemp("suite_model")
    torch.manual_seed(0)
    config = toy_clip_config()
    for sub_config in (config, config.text_config, config.vision_config):
        sub_config.initializer_factor = 3.0
    CLIPModel(config).eval().save_pretrained(root / "clip")
    AutoProcessor.from_pretrained(save_toy_clip(root / "toy", seed=0)).save_pretrained(root / "clip")
    upcycle_clip(root / "clip", root / "moe", num_experts=4, top_k=2, seed=0)
    return root / "moe"


@pytest.fixture(scope="module")
def suite_data(tmp_path_factory):
    """A save_to_disk folder (columns img / digit, a ClassLabel) and a parquet file (image / label, a ClassLabel), and
    a two-task suite naming them by paths relative to the suite file."""
    import datasets

    from hf_moe.toy_data import DIGIT_NAMES, digit_images

    root = tmp_path_factory.mktemp("suite_data")
    labels_feature = datasets.ClassLabel(names=list(DIGIT_NAMES))
    images, labels = digit_images(30, offset=0)
    features = datasets.Features({"img": datasets.Image(), "digit": labels_feature})
    datasets.Dataset.from_dict({"img": images, "digit": labels}, features=features).save_to_disk(root / "disk")
    images, labels = digit_images(24, offset=500)
    features = datasets.Features({"image": datasets.Image(), "label": labels_feature})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
        root / "digits.parquet"
    )
    templates = ["a photo of the number {}.", "a handwritten {}."]
    (root / "templates.txt").write_text("\n".join(templates) + "\n")
    suite = {
        "name": "two",
        "description": "two local tasks",
        "tasks": [
            {"name": "disk_top1", "data": "disk", "image_column": "img", "label_column": "digit",
             "class_names": "feature", "templates": templates, "metric": "top1", "source": "made here"},
            {"name": "parquet_mpc", "data": "digits.parquet", "split": "test", "class_names": list(DIGIT_NAMES),
             "templates": "default", "metric": "mean_per_class", "source": "made here"},
        ],
    }  # fmt: skip
    (root / "suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    return root


def single_task(model, data, output, *options):
    from hf_moe.evaluation import evaluate_command

    return evaluate_command(
        ["zero-shot", "--model", str(model), "--data", str(data), "--output", str(output), *options]
    )


def test_two_task_suite_equals_single_task_evaluations(suite_model, suite_data, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from hf_moe.eval_suites import suite_command

    model = tmp_path / "model"
    shutil.copytree(suite_model, model)
    disk = single_task(model, suite_data / "disk", tmp_path / "a.json", "--image_column", "img", "--label_column",
                       "digit", "--templates", str(suite_data / "templates.txt"))  # fmt: skip
    parquet = single_task(model, suite_data / "digits.parquet", tmp_path / "b.json", "--split", "test", "--templates",
                          "default")  # fmt: skip
    capsys.readouterr()

    results = suite_command(["--model", str(model), "--suite", str(suite_data / "suite.yaml")])
    table = capsys.readouterr().out
    expected = {"disk_top1": disk["top1_accuracy"], "parquet_mpc": parquet["mean_per_class_accuracy"]}
    assert 0 < expected["disk_top1"] < 1  # the toy model's predictions spread over several classes

    # JSON (beside the model by default) and the returned results
    written = json.loads((model / "eval_suite_two.json").read_text())
    assert written["table"] == results["table"]
    assert [row["task"] for row in written["table"]] == ["disk_top1", "parquet_mpc"]
    assert [row["metric"] for row in written["table"]] == ["top1", "mean_per_class"]
    assert {row["task"]: row["score"] for row in written["table"]} == expected
    assert [row["num_images"] for row in written["table"]] == [30, 24]
    for entry, single in zip(written["tasks"], (disk, parquet)):
        for key in ("top1_accuracy", "mean_per_class_accuracy", "num_images", "num_classes", "num_templates"):
            assert entry["metrics"][key] == single[key], (entry["name"], key)
    # CSV
    with open(model / "eval_suite_two.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["task"], row["metric"], float(row["score"]), int(row["num_images"])) for row in rows] == [
        ("disk_top1", "top1", expected["disk_top1"], 30),
        ("parquet_mpc", "mean_per_class", expected["parquet_mpc"], 24),
    ]
    # One printed table
    lines = table.strip().splitlines()
    assert lines[0].split() == ["task", "metric", "score", "images"]
    assert lines[2].split() == ["disk_top1", "top1", f"{expected['disk_top1']:.4f}", "30"]
    assert lines[3].split() == ["parquet_mpc", "mean_per_class", f"{expected['parquet_mpc']:.4f}", "24"]
    # Model card: every float metric of each task in the model-index, named by the task, with its split
    card = ModelCard.load(model / "README.md")
    entries = {(r.dataset_name, r.metric_type): r for r in card.data.eval_results}
    for entry in written["tasks"]:
        for key in ("top1_accuracy", "mean_per_class_accuracy"):
            result = entries[(entry["name"], key)]
            assert result.metric_value == pytest.approx(entry["metrics"][key])
            assert result.task_type == "zero-shot-image-classification"
            assert result.dataset_split == entry["split"]
    assert entries[("parquet_mpc", "mean_per_class_accuracy")].dataset_split == "test"

    # --tasks and --output_dir
    out = tmp_path / "out"
    only = suite_command(["--model", str(model), "--suite", str(suite_data / "suite.yaml"), "--tasks", "parquet_mpc",
                          "--output_dir", str(out)])  # fmt: skip
    assert [row["task"] for row in only["table"]] == ["parquet_mpc"]
    assert json.loads((out / "eval_suite_two.json").read_text())["table"] == only["table"]


def test_data_and_class_names_are_checked_before_the_model_loads(suite_data, tmp_path):
    from hf_moe.eval_suites import suite_command

    suite = yaml.safe_load((suite_data / "suite.yaml").read_text())
    suite["tasks"][1]["class_names"] = ["zero", "one", "two"]
    path = tmp_path / "bad.yaml"
    for task in suite["tasks"]:
        task["data"] = str(suite_data / task["data"])
    path.write_text(yaml.safe_dump(suite))
    missing_model = tmp_path / "no-model-here"
    with pytest.raises(SuiteError, match=r"task 'parquet_mpc': key 'class_names': 3 class names, .* 10 classes"):
        suite_command(["--model", str(missing_model), "--suite", str(path)])
    suite["tasks"][1]["class_names"] = "feature"
    suite["tasks"][0]["label_column"] = "no_such_column"
    path.write_text(yaml.safe_dump(suite))
    with pytest.raises(SuiteError, match=r"task 'disk_top1': key 'data'.*no_such_column"):
        suite_command(["--model", str(missing_model), "--suite", str(path)])
    with pytest.raises(SuiteError, match=r"--tasks nope: no such task"):
        suite_command(["--model", str(missing_model), "--suite", str(suite_data / "suite.yaml"), "--tasks", "nope"])
