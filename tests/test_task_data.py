import collections

import numpy as np
import pytest

from hf_moe.evaluation import class_names_of, load_image_dataset
from hf_moe.task_data import TASK_CLASSES, TASK_NAMES, build_task, build_tasks, save_task_folders


SMALL = dict(train_per_class=6, test_per_class=3, size=32)


@pytest.fixture(scope="module")
def tasks():
    return build_tasks(**SMALL, seed=0)


def test_at_least_four_distinct_tasks(tasks):
    assert len(TASK_NAMES) >= 4
    assert len({tuple(task.class_names) for task in tasks.values()}) == len(tasks)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_sizes_balance_and_sorted_classes(tasks, name):
    task = tasks[name]
    assert task.class_names == sorted(task.class_names) == TASK_CLASSES[name]
    for split, per_class in (("train", 6), ("test", 3)):
        images, labels = task.images(split), task.labels(split)
        assert len(images) == len(labels) == per_class * len(task.class_names)
        assert collections.Counter(labels) == {label: per_class for label in range(len(task.class_names))}
        assert all(image.mode == "RGB" and image.size == (32, 32) for image in images)
    assert all("{}" in template for template in task.templates)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_deterministic_by_seed(tasks, name):
    again = build_task(name, **SMALL, seed=0)
    other = build_task(name, **SMALL, seed=1)
    pairs = zip(tasks[name].images("train"), again.images("train"))
    same = [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs]
    assert all(same) and tasks[name].labels("test") == again.labels("test")
    pairs = zip(again.images("train"), other.images("train"))
    differs = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs]
    assert any(differs)


def test_digit_splits_are_disjoint():
    task = build_task("digits", train_per_class=100, test_per_class=74, size=8)
    train = {np.asarray(image).tobytes() for image in task.images("train")}
    test = [np.asarray(image).tobytes() for image in task.images("test")]
    # sklearn's digits hold a few exact duplicates; the splits share no index, so overlap stays tiny.
    assert sum(image in train for image in test) <= 5
    with pytest.raises(ValueError, match="per class"):
        build_task("digits", train_per_class=150, test_per_class=30)


def test_bad_arguments_refused(tasks):
    with pytest.raises(ValueError, match="Unknown task"):
        build_task("cifar")
    with pytest.raises(ValueError, match="Unknown split"):
        tasks["shapes"].images("validation")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_class_folders_load_like_zero_shot_data(tasks, name, tmp_path):
    task = tasks[name]
    folder = save_task_folders(task, tmp_path / name, "test")
    dataset = load_image_dataset(folder)
    assert class_names_of(dataset) == task.class_names
    assert sorted(dataset["label"]) == sorted(task.labels("test"))
    in_memory = task.dataset("test")
    assert class_names_of(in_memory) == task.class_names and len(in_memory) == len(dataset)
