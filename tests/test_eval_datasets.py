"""`hf-moe eval` on Hugging Face datasets: every source (save_to_disk folders, parquet files, a local dataset
repository read as a Hub id is, a Hub id passed through to `datasets.load_dataset`) gives the same split with
canonical columns; clear errors before any model loads; mean per-class accuracy equals scikit-learn's balanced
accuracy; every family (dense CLIP, CLIP-MoE, WEMoE, MoDE) through the same command; MoDE retrieval equals its own
forward; the card's model-index records the dataset id, config and split; MoDE's report scores by the official metric
per dataset; `hf-moe eval suite` dispatches to `hf_moe.eval_suites`."""

import json
import shutil
import sys
import types

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from sklearn.metrics import balanced_accuracy_score
from test_merging import save_vision_finetune
from test_mode_build import write_clusters
from transformers import AutoProcessor

from hf_moe.cards import add_eval_results, write_model_card
from hf_moe.eval_data import load_eval_dataset
from hf_moe.evaluation import (
    evaluate_command,
    image_text_retrieval,
    retrieval_embeddings,
    zero_shot_classification,
)
from hf_moe.loading import load_pretrained
from hf_moe.metrics import load_metric
from hf_moe.mode.report import evaluate_task, official_metric
from hf_moe.mode.report import main as report_main
from hf_moe.task_data import build_task
from hf_moe.toy import save_toy_clip

from helpers import save_tiny_bert


TEMPLATE = "a photo of a {}."
CAPTIONS = ("a red circle", "a blue square", "a green triangle", "a striped shape", "a dotted thing", "a big star")


# --------------------------------------------------------------------------------------------------------------
# Data: one labelled split and one captioned split, written in every form
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    task = build_task("shapes", train_per_class=1, test_per_class=3, size=16)
    names = list(task.class_names)
    label = datasets.ClassLabel(names=names)

    def split(name):
        images, labels = task.images(name), task.labels(name)
        features = datasets.Features({"image": datasets.Image(), "label": label})
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    test, train = split("test"), split("train")
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(root / "saved")
    test.save_to_disk(root / "saved_test")
    # CIFAR-100's layout: `img`, `fine_label` and a second label column that must not be taken for the label.
    cifar_like = test.rename_columns({"image": "img", "label": "fine_label"}).add_column(
        "coarse_label", [0] * len(test)
    )
    (root / "parquet").mkdir()
    cifar_like.select(range(0, 6)).to_parquet(root / "parquet" / "test-00000.parquet")
    cifar_like.select(range(6, len(test))).to_parquet(root / "parquet" / "test-00001.parquet")
    # A dataset repository as a Hub snapshot holds it: parquet data files and the README.md `configs:` header.
    repo = root / "repo"
    (repo / "data").mkdir(parents=True)
    test.to_parquet(repo / "data" / "test-00000-of-00001.parquet")
    train.to_parquet(repo / "data" / "train-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: shapes\n  data_files:\n  - split: test\n    path: data/test-*.parquet\n"
        "  - split: train\n    path: data/train-*.parquet\n- config_name: small\n  data_files:\n  - split: test\n"
        "    path: data/train-*.parquet\n---\n# shapes\n"
    )
    # Retrieval: a list of captions per image (nlphuji/flickr30k's `caption`), and one string per row (`sentence`).
    images = task.images("test")[: len(CAPTIONS)]
    captioned = datasets.Dataset.from_dict(
        {"image": images, "caption": [[text, f"{text} again"] for text in CAPTIONS]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))}),
    )
    captioned.to_parquet(root / "captions.parquet")
    one_each = captioned.map(lambda row: {"sentence": row["caption"][0]}, remove_columns=["caption"])
    one_each.to_parquet(root / "sentences.parquet")
    (root / "template.txt").write_text(TEMPLATE + "\n")
    return types.SimpleNamespace(
        root=root, test=test, names=names, captioned=captioned, one_each=one_each, template=root / "template.txt"
    )


def pixels(dataset) -> list:
    return [np.asarray(image.convert("RGB")) for image in dataset["image"]]


def test_every_source_gives_the_same_split_with_canonical_columns(data):
    root = data.root
    parquet = {"image_column": "img", "label_column": "fine_label"}
    sources = {
        "save_to_disk DatasetDict": load_eval_dataset(root / "saved", "test"),
        "save_to_disk DatasetDict, default split": load_eval_dataset(str(root / "saved")),
        "save_to_disk Dataset": load_eval_dataset(root / "saved_test"),
        "parquet glob": load_eval_dataset(str(root / "parquet" / "test-*.parquet"), **parquet),
        "parquet list": load_eval_dataset(sorted((root / "parquet").glob("*.parquet")), "test", **parquet),
        "parquet folder": load_eval_dataset(root / "parquet", **parquet),
        "repository, config and split": load_eval_dataset(str(root / "repo"), "test", config="shapes"),
        "in-memory DatasetDict": load_eval_dataset(datasets.DatasetDict({"test": data.test})),
    }
    expected_labels, expected_pixels = data.test["label"], pixels(data.test)
    for source, dataset in sources.items():
        assert {"image", "label"} <= set(dataset.column_names), source
        assert dataset.features["label"].names == data.names, source  # the ClassLabel gives the class names
        assert dataset["label"] == expected_labels, source
        assert all(np.array_equal(a, b) for a, b in zip(pixels(dataset), expected_pixels)), source
    assert "coarse_label" in sources["parquet glob"].column_names  # other columns stay, untouched
    other = load_eval_dataset(str(root / "repo"), "test", config="small")  # the config picks the files
    assert other["label"] == load_eval_dataset(root / "saved", "train")["label"]
    # Captions: a list per image or a string per row, under their own names.
    assert load_eval_dataset(root / "captions.parquet", task="retrieval")["text"] == data.captioned["caption"]
    sentences = load_eval_dataset(root / "sentences.parquet", caption_column="sentence", task="retrieval")
    assert sentences["text"] == [text for text in CAPTIONS]
    # filters keep the rows whose source column holds the value (nlphuji/flickr30k's `split` column).
    kept = load_eval_dataset(root / "saved", "test", filters={"label": [0, 2]})
    assert kept["label"] == [label for label in data.test["label"] if label in (0, 2)]


def test_errors_name_the_data_split_and_columns_before_the_model_loads(data, tmp_path, monkeypatch):
    root = data.root
    parquet = root / "parquet" / "test-00000.parquet"
    columns = "['img', 'fine_label', 'coarse_label']"
    with pytest.raises(ValueError) as error:
        load_eval_dataset(parquet, label_column="fine")
    message = str(error.value)
    assert str(parquet) in message and "split 'test'" in message and "'fine'" in message and columns in message
    with pytest.raises(ValueError, match=r"no label column 'label'.*" + re_escape(columns) + ".*--label_column"):
        load_eval_dataset(parquet, image_column="img", task="zero-shot")
    with pytest.raises(ValueError, match=r"no caption column 'text' or 'caption' or 'captions'"):
        load_eval_dataset(root / "saved", "test", task="retrieval")
    with pytest.raises(ValueError, match=r"has no split 'validation'; it has \['train', 'test'\]"):
        load_eval_dataset(root / "saved", "validation")
    with pytest.raises(ValueError, match=r"config 'nope'.*split 'test'"):
        load_eval_dataset(str(root / "repo"), "test", config="nope")
    for missing in (tmp_path / "missing", "./missing_folder", "data/sub/missing", "missing.parquet"):
        with pytest.raises(FileNotFoundError, match=f"'{re_escape(str(missing))}' does not exist"):
            load_eval_dataset(missing)
    # A Hub id without network (the tests run with HF_HUB_OFFLINE=1): named, with the config.
    with pytest.raises(OSError, match=r"'hf-moe-test/no-such-dataset'.*cropped_digits"):
        load_eval_dataset("hf-moe-test/no-such-dataset", "test", config="cropped_digits")

    # Through the command: the data is refused before the model is read (here the model does not even exist).
    model = tmp_path / "no-model"
    for argv, match in [
        (["--data", str(parquet), "--image_column", "img", "--label_column", "fine"], "no column 'fine'"),
        (["--data", str(tmp_path / "missing")], "does not exist"),
        (["--data", str(root / "saved"), "--split", "validation"], "no split 'validation'"),
    ]:
        with pytest.raises((ValueError, OSError), match=match):
            evaluate_command(["zero-shot", "--model", str(model), *argv])


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


# --------------------------------------------------------------------------------------------------------------
# Models: one of every family
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(toy_clip_dir, upcycled_dir, tmp_path_factory):
    from hf_moe.conversion import merge_wemoe
    from hf_moe.mode.build import main as build_mode

    root = tmp_path_factory.mktemp("eval_models")
    folders = {"clip": root / "clip", "clip_moe": root / "clip_moe"}
    shutil.copytree(toy_clip_dir, folders["clip"])  # copies: `hf-moe eval` records results in their cards
    shutil.copytree(upcycled_dir, folders["clip_moe"])
    finetunes = [save_vision_finetune(toy_clip_dir, root / f"task{i}", seed=30 + i) for i in range(2)]
    folders["we_moe"] = root / "we_moe"
    merge_wemoe(toy_clip_dir, finetunes, folders["we_moe"], task_names=["a", "b"], return_model=False)
    bert = save_tiny_bert(root / "bert")
    write_clusters(root / "clusters", encoder=bert)
    folders["mode"] = root / "mode"
    second = save_toy_clip(root / "expert1", seed=1)
    build_mode(
        [str(toy_clip_dir), str(second), "--clusters", str(root / "clusters"), "--output_dir", str(root / "mode")]
    )
    for folder in folders.values():
        if not (folder / "README.md").is_file():
            write_model_card(folder, base_model=None, how_built="test")
    return folders


@pytest.mark.parametrize("family", ["clip", "clip_moe", "we_moe", "mode"])
def test_zero_shot_on_save_to_disk_and_parquet_for_every_family(family, models, data, tmp_path):
    folder = models[family]
    common = ["--model", str(folder), "--templates", str(data.template), "--batch_size", "4"]
    saved = evaluate_command(["zero-shot", *common, "--data", str(data.root / "saved"), "--split", "test",
                              "--output", str(tmp_path / "saved.json")])  # fmt: skip
    parquet = evaluate_command(["zero-shot", *common, "--data", str(data.root / "parquet" / "test-*.parquet"),
                                "--image_column", "img", "--label_column", "fine_label",
                                "--output", str(tmp_path / "parquet.json")])  # fmt: skip
    # The reference: the Python API on the in-memory split, one image per batch (WEMoE routes per sample: its
    # scores must not depend on the batch).
    model, processor = load_pretrained(folder), AutoProcessor.from_pretrained(folder)
    reference = zero_shot_classification(
        model, processor, data.test, templates=[TEMPLATE], batch_size=1, return_predictions=True, progress=False
    )
    keys = ["top1_accuracy", "mean_per_class_accuracy", "num_images", "num_classes"]
    keys += ["task_weights"] if family == "mode" else []
    for results in (saved, parquet):
        assert {key: results[key] for key in keys} == pytest.approx({key: reference[key] for key in keys}, abs=1e-6)
        assert results["num_images"] == len(data.test) and results["num_classes"] == len(data.names)
    assert reference["mean_per_class_accuracy"] == pytest.approx(
        balanced_accuracy_score(data.test["label"], reference["predictions"])
    )
    assert json.loads((tmp_path / "parquet.json").read_text())["options"]["label_column"] == "fine_label"
    card = ModelCard.load(folder / "README.md")
    recorded = {(r.dataset_name, r.metric_type) for r in card.data.eval_results}
    assert {("saved", "mean_per_class_accuracy"), ("test-*.parquet", "top1_accuracy")} <= recorded


def test_mean_per_class_accuracy_is_balanced_accuracy_on_a_skewed_set(models, data):
    labels = data.test["label"]
    rows = [i for i, label in enumerate(labels) if label == 0] + [labels.index(1), labels.index(2)]
    skewed = data.test.select(rows)  # class 0 three times as often as the others
    model, processor = load_pretrained(models["clip"]), AutoProcessor.from_pretrained(models["clip"])
    results = zero_shot_classification(
        model, processor, skewed, templates=[TEMPLATE], return_predictions=True, progress=False
    )
    references = skewed["label"]
    expected = balanced_accuracy_score(references, results["predictions"])
    assert results["mean_per_class_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert results["mean_per_class_accuracy"] != pytest.approx(results["top1_accuracy"])
    metric = load_metric("mean_per_class_accuracy")
    # Classes only predicted do not count; each reference class weighs the same however many images it has.
    assert metric.compute(predictions=[0, 0, 0, 5], references=[0, 0, 0, 1]) == {"mean_per_class_accuracy": 0.5}
    assert metric.compute(predictions=[], references=[]) == {"mean_per_class_accuracy": 0.0}


# --------------------------------------------------------------------------------------------------------------
# Hub ids and the card
# --------------------------------------------------------------------------------------------------------------


def test_a_hub_id_config_and_split_reach_load_dataset_and_the_card(models, data, tmp_path, monkeypatch):
    # A local dataset repository goes through the same `datasets.load_dataset` call a Hub id does (default split).
    assert load_eval_dataset(str(data.root / "repo"), config="shapes")["label"] == data.test["label"]
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return data.test.rename_columns({"image": "picture"})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = load_eval_dataset("someone/shapes", "test", config="cfg", image_column="picture")
    assert calls == [("someone/shapes", "cfg", "test")] and dataset["label"] == data.test["label"]
    # No split asked for: the split names are read first (nothing downloaded), then test > validation > the only one.
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda path, name=None, **kwargs: ["train", "test"])
    load_eval_dataset("someone/shapes", image_column="picture")
    assert calls[-1] == ("someone/shapes", None, "test")

    folder = tmp_path / "clip"
    shutil.copytree(models["clip"], folder)
    argv = ["zero-shot", "--model", str(folder), "--data", "someone/shapes", "--dataset_config", "cfg"]
    argv += ["--split", "test", "--image_column", "picture", "--templates", str(data.template)]
    results = evaluate_command([*argv, "--output", str(tmp_path / "eval.json")])
    assert calls[-1] == ("someone/shapes", "cfg", "test") and results["data"] == "someone/shapes"
    model_index = ModelCard.load(folder / "README.md").data.to_dict()["model-index"][0]["results"]
    entry = next(result for result in model_index if result["dataset"]["type"] == "someone/shapes")
    assert entry["dataset"] == {"type": "someone/shapes", "name": "someone/shapes", "config": "cfg", "split": "test"}
    assert entry["task"] == {"type": "zero-shot-image-classification"}
    values = {metric["type"]: metric["value"] for metric in entry["metrics"]}
    assert values == {
        "top1_accuracy": results["top1_accuracy"],
        "mean_per_class_accuracy": results["mean_per_class_accuracy"],
    }


def test_card_model_index_round_trip_with_dataset_id_config_and_split(models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(models["clip"], folder)
    write_model_card(folder, base_model=None, how_built="test")
    task = "zero-shot-image-classification"
    names = {"mean_per_class_accuracy": "Mean per-class accuracy"}
    add_eval_results(folder, {"top1_accuracy": 0.5, "mean_per_class_accuracy": 0.25}, task=task, dataset="svhn",
                     dataset_id="ufldl-stanford/svhn", dataset_config="cropped_digits", dataset_split="test",
                     metric_names=names)  # fmt: skip
    # Another split is another result; the same split, config and metric replaces.
    add_eval_results(folder, {"top1_accuracy": 0.75}, task=task, dataset="svhn", dataset_id="ufldl-stanford/svhn",
                     dataset_config="cropped_digits", dataset_split="train")  # fmt: skip
    add_eval_results(folder, {"top1_accuracy": 0.625}, task=task, dataset="svhn", dataset_id="ufldl-stanford/svhn",
                     dataset_config="cropped_digits", dataset_split="test")  # fmt: skip
    add_eval_results(folder, {"top1_accuracy": 0.125}, task=task, dataset="shapes")  # local data, as before
    card = ModelCard.load(folder / "README.md")
    results = {
        (r.dataset_type, r.dataset_name, r.dataset_config, r.dataset_split, r.metric_type): (
            r.metric_name,
            r.metric_value,
        )
        for r in card.data.eval_results
    }
    svhn = ("ufldl-stanford/svhn", "svhn", "cropped_digits")
    assert results == {
        (*svhn, "test", "top1_accuracy"): ("top1_accuracy", 0.625),
        (*svhn, "test", "mean_per_class_accuracy"): ("Mean per-class accuracy", 0.25),
        (*svhn, "train", "top1_accuracy"): ("top1_accuracy", 0.75),
        ("shapes", "shapes", None, None, "top1_accuracy"): ("top1_accuracy", 0.125),
    }
    model_index = card.data.to_dict()["model-index"][0]["results"]
    datasets_seen = [result["dataset"] for result in model_index]
    assert {"type": "ufldl-stanford/svhn", "name": "svhn", "config": "cropped_digits", "split": "test"} in datasets_seen
    assert (
        "| zero-shot-image-classification | svhn (cropped_digits, test) | Mean per-class accuracy | 0.2500 |"
        in card.text
    )
    # The card the Hub reads parses back to the same results (huggingface_hub's model-index round trip).
    reparsed = ModelCard(str(card)).data.eval_results
    assert [(r.dataset_type, r.dataset_split, r.metric_value) for r in reparsed] == [
        (r.dataset_type, r.dataset_split, r.metric_value) for r in card.data.eval_results
    ]


# --------------------------------------------------------------------------------------------------------------
# Retrieval: dense CLIP and MoDE
# --------------------------------------------------------------------------------------------------------------


def test_mode_retrieval_ranks_as_its_forward(models, data):
    folder = models["mode"]
    model, processor = load_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    captions = [text for pair in data.captioned["caption"] for text in pair]
    embeddings = retrieval_embeddings(model, processor, data.captioned, captions, batch_size=4, progress=False)
    tokens = processor.tokenizer(captions, padding=True, return_tensors="pt")
    images = [image.convert("RGB") for image in data.captioned["image"]]
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    inputs = {key: value for key, value in tokens.items() if key != "token_type_ids"}
    with torch.no_grad():
        per_query = model(**inputs, pixel_values=pixel_values, per_query_weights=True)
        corpus = model(**inputs, pixel_values=pixel_values)
    scale = model.logit_scale.exp()
    # text->image: each caption its own task; image->text: the captions as one task's texts.
    torch.testing.assert_close(
        embeddings.text_queries @ embeddings.image_candidates.T, per_query.logits_per_text / scale
    )
    torch.testing.assert_close(embeddings.image_queries @ embeddings.text_candidates.T, corpus.logits_per_image / scale)
    torch.testing.assert_close(embeddings.query_weights, per_query.task_weights.float())
    torch.testing.assert_close(embeddings.corpus_weights, corpus.task_weights.float())
    assert (per_query.task_weights.max(0).values - per_query.task_weights.min(0).values).max() > 1e-4  # per caption

    results = image_text_retrieval(model, processor, data.captioned, batch_size=4, k_values=[1, 2], progress=False)
    owner = torch.arange(len(images)).repeat_interleave(2)  # caption j belongs to image j // 2
    text_ranks = per_query.logits_per_text.argsort(dim=-1, descending=True)
    image_ranks = corpus.logits_per_image.argsort(dim=-1, descending=True)
    for k in (1, 2):
        text_to_image = (text_ranks[:, :k] == owner[:, None]).any(-1).double().mean().item()
        image_to_text = torch.stack([(owner[image_ranks[i, :k]] == i).any() for i in range(len(images))])
        assert results[f"text_to_image_R@{k}"] == pytest.approx(text_to_image)
        assert results[f"image_to_text_R@{k}"] == pytest.approx(image_to_text.double().mean().item())
    assert results["task_weights"] == pytest.approx(corpus.task_weights.tolist(), abs=1e-6)


@pytest.mark.parametrize("family", ["clip", "mode"])
def test_retrieval_through_the_command_on_parquet(family, models, data, tmp_path):
    folder = models[family]
    model, processor = load_pretrained(folder), AutoProcessor.from_pretrained(folder)
    common = ["retrieval", "--model", str(folder), "--k_values", "1", "2", "--batch_size", "4"]
    listed = evaluate_command([*common, "--data", str(data.root / "captions.parquet"),
                               "--output", str(tmp_path / "a.json")])  # fmt: skip
    single = evaluate_command([*common, "--data", str(data.root / "sentences.parquet"), "--caption_column", "sentence",
                               "--output", str(tmp_path / "b.json")])  # fmt: skip
    for results, dataset in ((listed, data.captioned), (single, data.one_each.rename_column("sentence", "text"))):
        reference = image_text_retrieval(model, processor, dataset, k_values=[1, 2], progress=False)
        keys = [key for key in reference if key.startswith(("image_to_text", "text_to_image", "num_"))]
        assert {key: results[key] for key in keys} == {key: reference[key] for key in keys}
    assert listed["num_texts"] == 2 * len(CAPTIONS) and single["num_texts"] == len(CAPTIONS)
    card = ModelCard.load(folder / "README.md")
    assert ("captions.parquet", "image_to_text_R@1") in {
        (r.dataset_name, r.metric_type) for r in card.data.eval_results
    }


# --------------------------------------------------------------------------------------------------------------
# MoDE's report metric per dataset; the suite dispatch
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, metric",
    [
        ("fgvc_aircraft", "mean_per_class"),
        ("FGVCAircraft", "mean_per_class"),
        ("oxford_pets", "mean_per_class"),
        ("OxfordPets", "mean_per_class"),
        ("oxford-iiit-pet", "mean_per_class"),
        ("caltech101", "mean_per_class"),
        ("Caltech-101", "mean_per_class"),
        ("flowers102", "mean_per_class"),
        ("tanganke/oxford_flowers102", "mean_per_class"),
        ("cifar10", "top1"),
        ("ImageNet", "top1"),
        ("dtd", "top1"),
        ("petsmart", "top1"),
    ],
)
def test_official_metric_by_dataset_name(name, metric):
    assert official_metric(name) == {"top1": "top1_accuracy", "mean_per_class": "mean_per_class_accuracy"}[metric]


def test_mode_report_scores_each_task_by_its_official_metric(models, data, tmp_path):
    folder = models["mode"]
    tasks = tmp_path / "tasks"
    # The report reads class folders: the same skewed images (all of class 0, one of each other class) twice.
    labels = data.test["label"]
    skewed = [i for i, label in enumerate(labels) if label == 0] + [labels.index(k) for k in range(1, len(data.names))]
    for name in ("flowers102", "shapes"):
        for index in skewed:
            (tasks / name / data.names[labels[index]]).mkdir(parents=True, exist_ok=True)
            data.test[index]["image"].save(tasks / name / data.names[labels[index]] / f"{index}.png")
    argv = ["--model", str(folder), "--tasks", str(tasks / "flowers102"), str(tasks / "shapes")]
    rows = report_main([*argv, "--templates", str(data.template), "--output", str(tmp_path / "report.csv")])
    assert [row["metric"] for row in rows] == ["mean_per_class_accuracy", "top1_accuracy", "mixed"]
    model, processor = load_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    report = evaluate_task(model, processor, tasks / "shapes", templates=[TEMPLATE], progress=False)
    labels = load_eval_dataset(tasks / "shapes")["label"]
    for column, predicted in report.predictions.items():  # expert-k, all_unit, ensemble
        assert rows[0][column] == pytest.approx(balanced_accuracy_score(labels, predicted)), column
        assert rows[1][column] == pytest.approx(float(np.mean(np.array(predicted) == np.array(labels)))), column
    assert any(rows[0][column] != pytest.approx(rows[1][column]) for column in report.predictions)  # the skew shows
    assert "metric" in (tmp_path / "report.csv").read_text().splitlines()[0]
    overridden = report_main([*argv, "--templates", str(data.template), "--metric", "top1",
                              "--output", str(tmp_path / "top1.csv")])  # fmt: skip
    assert [row["metric"] for row in overridden] == ["top1_accuracy"] * 3
    assert {key: value for key, value in overridden[0].items() if key != "dataset"} == {
        key: value for key, value in rows[1].items() if key != "dataset"
    }
    card = (folder / "README.md").read_text()
    assert "ensemble_mean_per_class_accuracy" in card and "flowers102" in card


def test_eval_suite_dispatches_to_the_suite_module(monkeypatch):
    seen = []
    fake = types.ModuleType("hf_moe.eval_suites")
    fake.suite_command = lambda argv: seen.append(argv) or {"ok": True}
    monkeypatch.setitem(sys.modules, "hf_moe.eval_suites", fake)
    assert evaluate_command(["suite", "--model", "m", "--suite", "ta8"]) == {"ok": True}
    assert evaluate_command(["--suite", "ta8", "--model", "m"]) == {"ok": True}
    assert evaluate_command(["--model", "m", "--suite=ta8"]) == {"ok": True}
    assert seen == [
        ["--model", "m", "--suite", "ta8"],
        ["--suite", "ta8", "--model", "m"],
        ["--model", "m", "--suite=ta8"],
    ]
