"""Zero-shot classification and retrieval evaluation against brute-force references computed here, one image
and one text at a time, for a dense CLIP folder and its upcycled CLIP-MoE loaded through trust_remote_code."""

import json
import logging
import shutil
import socket

import datasets
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, CLIPModel

from hf_moe.class_names import imagenet_wnids, load_class_names, resolve_class_names
from hf_moe.evaluation import (
    DEFAULT_TEMPLATES,
    IMAGENET_TEMPLATES,
    class_names_of,
    evaluate_command,
    image_text_retrieval,
    resolve_templates,
    write_results,
    zero_shot_classification,
)
from hf_moe.metrics import load_metric
from hf_moe.toy import toy_clip_config
from hf_moe.toy_data import DIGIT_NAMES, save_digit_caption_folder, save_digit_class_folders


@pytest.fixture(scope="module")
def varied_clip_dir(toy_clip_dir, tmp_path_factory):
    """A toy CLIP initialised with 3x the usual weight scale: at the default scale a random CLIP gives every
    digit image the same class, which would make the zero-shot comparison trivial; here predictions spread
    over several classes (checked in the test)."""
    torch.manual_seed(0)
    config = toy_clip_config()
    for sub_config in (config, config.text_config, config.vision_config):
        sub_config.initializer_factor = 3.0
    output = tmp_path_factory.mktemp("eval") / "clip"
    CLIPModel(config).eval().save_pretrained(output)
    AutoProcessor.from_pretrained(toy_clip_dir).save_pretrained(output)
    return output


@pytest.fixture(scope="module")
def varied_moe_dir(varied_clip_dir, tmp_path_factory):
    from hf_moe.conversion import upcycle_clip

    output = tmp_path_factory.mktemp("eval") / "clip-moe"
    upcycle_clip(varied_clip_dir, output, num_experts=4, top_k=2, seed=0)
    return output


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    return save_digit_class_folders(tmp_path_factory.mktemp("eval") / "classes", count=30)


@pytest.fixture(scope="module")
def caption_folder(tmp_path_factory):
    return save_digit_caption_folder(tmp_path_factory.mktemp("eval") / "captions", count=12, captions_per_image=2)


def load(model_dir):
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    return model, AutoProcessor.from_pretrained(model_dir)


MODELS = ["varied_clip_dir", "varied_moe_dir"]


# ---------------------------------------------------------------- references: one image / one text at a time


def features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def embed_image(model, processor, image):
    pixel_values = processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
    embedding = features(model.eval().get_image_features(pixel_values=pixel_values))[0]
    return embedding / embedding.norm()


@torch.no_grad()
def embed_text(model, processor, text):
    tokens = processor.tokenizer([text], truncation=True, return_tensors="pt")
    output = model.eval().get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    embedding = features(output)[0]
    return embedding / embedding.norm()


def first_hit_rank(similarities, relevant):
    """0-based rank of the best-ranked relevant candidate in a full descending sort."""
    order = sorted(range(len(similarities)), key=lambda j: -float(similarities[j]))
    return min(order.index(j) for j in relevant)


# ---------------------------------------------------------------- templates and metric scripts


def test_templates():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert 6 <= len(DEFAULT_TEMPLATES) <= 10 and set(DEFAULT_TEMPLATES) <= set(IMAGENET_TEMPLATES)
    assert all(template.count("{}") == 1 for template in IMAGENET_TEMPLATES)
    assert resolve_templates(None) == DEFAULT_TEMPLATES
    assert resolve_templates("imagenet") == IMAGENET_TEMPLATES
    assert resolve_templates("auto") == resolve_templates("auto", "cifar10") == DEFAULT_TEMPLATES
    assert resolve_templates("auto", "imagenet") == resolve_templates(None, "imagenet") == IMAGENET_TEMPLATES
    assert resolve_templates("default", "imagenet") == DEFAULT_TEMPLATES
    assert resolve_templates("a {} digit") == ("a {} digit",)
    with pytest.raises(ValueError, match="exactly once"):
        resolve_templates(["no placeholder"])


def test_local_metric_scripts_need_no_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the metric scripts must load without network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    accuracy = load_metric("accuracy")
    assert accuracy.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1]) == {"accuracy": 0.75}
    recall = load_metric("recall_at_k")
    scores = recall.compute(predictions=[[2, 0, 1], [1, 2, 0], [0, 2, 1]], references=[[0], [0, 2], [1]], k=[1, 2, 3])
    assert scores == pytest.approx({"recall@1": 0.0, "recall@2": 2 / 3, "recall@3": 1.0})


# ---------------------------------------------------------------- zero-shot classification


@pytest.mark.parametrize("model_fixture", MODELS)
def test_zero_shot_matches_reference_loop(model_fixture, class_folders, request):
    model, processor = load(request.getfixturevalue(model_fixture))
    assert type(model).__name__ == ("CLIPMoEModel" if "moe" in model_fixture else "CLIPModel")
    model.train()
    results = zero_shot_classification(
        model, processor, class_folders, batch_size=7, return_predictions=True, progress=False
    )
    assert model.training, "the model's training flag is restored"

    dataset = datasets.load_dataset("imagefolder", data_dir=str(class_folders), split="train")
    names = dataset.features["label"].names
    class_embeddings = []
    for name in names:
        per_template = torch.stack([embed_text(model, processor, t.format(name)) for t in DEFAULT_TEMPLATES])
        mean = per_template.mean(dim=0)
        class_embeddings.append(mean / mean.norm())
    class_embeddings = torch.stack(class_embeddings)
    predictions, labels = [], []
    for row in dataset:
        predictions.append(int((class_embeddings @ embed_image(model, processor, row["image"])).argmax()))
        labels.append(row["label"])

    assert len(set(predictions)) >= 3, "the reference must not predict one class for every image"
    assert results["predictions"] == predictions
    assert results["top1_accuracy"] == pytest.approx(sum(p == y for p, y in zip(predictions, labels)) / len(labels))
    assert results["num_images"] == 30 and results["num_classes"] == 10
    assert results["num_templates"] == len(DEFAULT_TEMPLATES)


def test_zero_shot_on_a_dataset_with_class_names(varied_clip_dir, class_folders):
    model, processor = load(varied_clip_dir)
    from_folder = zero_shot_classification(
        model, processor, class_folders, templates="a {} digit", return_predictions=True, progress=False
    )
    folder = datasets.load_dataset("imagefolder", data_dir=str(class_folders), split="train")
    # The same images with plain int labels, in digit order, and the class names passed explicitly.
    folder_names = folder.features["label"].names
    dataset = datasets.Dataset.from_dict(
        {
            "image": [Image.open(path) for path in sorted(class_folders.rglob("*.png"))],
            "label": [DIGIT_NAMES.index(path.parent.name) for path in sorted(class_folders.rglob("*.png"))],
        }
    )
    from_dataset = zero_shot_classification(
        model, processor, dataset, templates=["a {} digit"], class_names=DIGIT_NAMES, progress=False
    )
    assert from_dataset["top1_accuracy"] == pytest.approx(from_folder["top1_accuracy"])
    assert from_folder["predictions"] != [from_folder["predictions"][0]] * 30
    assert set(folder_names) == set(DIGIT_NAMES)

    with pytest.raises(ValueError, match="class_names"):
        zero_shot_classification(model, processor, dataset, progress=False)
    named = datasets.Dataset.from_dict(
        {"image": dataset["image"][:2], "label": [0, 1]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["big_cat", "dog"])}),
    )
    assert class_names_of(named) == ["big cat", "dog"]


# ---------------------------------------------------------------- retrieval


@pytest.mark.parametrize("model_fixture", MODELS)
def test_retrieval_matches_brute_force(model_fixture, caption_folder, request):
    model, processor = load(request.getfixturevalue(model_fixture))
    k_values = (1, 2, 5, 10, 12, 24)
    results = image_text_retrieval(model, processor, caption_folder, batch_size=5, k_values=k_values, progress=False)

    dataset = datasets.load_dataset("imagefolder", data_dir=str(caption_folder), split="train")
    images = torch.stack([embed_image(model, processor, row["image"]) for row in dataset])
    captions, caption_image = [], []
    for index, row in enumerate(dataset):
        assert len(row["text"]) == 2
        captions.extend(row["text"])
        caption_image.extend([index, index])
    texts = torch.stack([embed_text(model, processor, caption) for caption in captions])
    similarities = images @ texts.T  # (12 images, 24 captions)

    image_ranks = [
        first_hit_rank(similarities[i], [j for j, owner in enumerate(caption_image) if owner == i])
        for i in range(len(dataset))
    ]
    text_ranks = [first_hit_rank(similarities[:, j], [caption_image[j]]) for j in range(len(captions))]
    for k in k_values:
        assert results[f"image_to_text_R@{k}"] == pytest.approx(sum(r < k for r in image_ranks) / len(image_ranks))
        assert results[f"text_to_image_R@{k}"] == pytest.approx(sum(r < k for r in text_ranks) / len(text_ranks))
    for direction in ("image_to_text", "text_to_image"):
        recalls = [results[f"{direction}_R@{k}"] for k in k_values]
        assert recalls == sorted(recalls), "R@k grows with k"
        assert 0 < recalls[0] < 1, "a non-trivial case"
    assert results["text_to_image_R@12"] == 1.0  # 12 images
    assert results["image_to_text_R@24"] == 1.0  # 24 captions
    assert results["num_images"] == 12 and results["num_texts"] == 24

    default = image_text_retrieval(model, processor, caption_folder, progress=False)
    assert set(default) == {
        f"{direction}_R@{k}" for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10)
    } | {"num_images", "num_texts", "num_skipped_images", "num_skipped_captions"}
    assert default["num_skipped_images"] == default["num_skipped_captions"] == 0
    assert all(default[key] == pytest.approx(results[key]) for key in default)


def write_caption_folder(folder, captions_per_image: list[list[str]], digits: list[int] | None = None):
    """A captioned image folder: the given digit images (default: the first ones) with the given caption lists in
    `metadata.jsonl`."""
    from hf_moe.toy_data import digit_images

    folder.mkdir(parents=True)
    all_images, _ = digit_images(max(digits or [len(captions_per_image) - 1]) + 1)
    images = [all_images[i] for i in digits or range(len(captions_per_image))]
    with open(folder / "metadata.jsonl", "w") as metadata:
        for i, (image, captions) in enumerate(zip(images, captions_per_image)):
            image.save(folder / f"{i:05d}.png")
            metadata.write(json.dumps({"file_name": f"{i:05d}.png", "text": captions}) + "\n")
    return folder


def digit_captions(index: int, count: int) -> list[str]:
    from hf_moe.toy_data import digit_caption

    return [digit_caption(index % 10, index + j) + f" (take {j})" for j in range(count)]


def recalls(results):
    return {key: value for key, value in results.items() if "_R@" in key}


def test_retrieval_skips_and_counts_empty_captions(varied_clip_dir, tmp_path, caplog):
    model, processor = load(varied_clip_dir)
    captions = [digit_captions(i, 3) for i in range(8)]
    with_empty = [list(c) for c in captions]
    with_empty[1][1] = ""  # one empty caption among good ones
    with_empty[4] = ["  ", ""]  # an image with no usable caption
    with_empty[6] = with_empty[6] + [" "]
    kept_images = [i for i in range(8) if i != 4]
    clean = [captions[i] for i in kept_images]
    clean[1] = [captions[1][0], captions[1][2]]
    folder = write_caption_folder(tmp_path / "with_empty", with_empty)
    with caplog.at_level(logging.WARNING, logger="hf_moe.evaluation"):
        results = image_text_retrieval(model, processor, folder, k_values=(1, 2, 5), progress=False)
    clean_folder = write_caption_folder(tmp_path / "clean", clean, kept_images)
    expected = image_text_retrieval(model, processor, clean_folder, k_values=(1, 2, 5), progress=False)
    assert results["num_images"] == 7 and results["num_texts"] == 20
    assert results["num_skipped_images"] == 1 and results["num_skipped_captions"] == 4
    assert recalls(results) == pytest.approx(recalls(expected)) and 0 < results["text_to_image_R@1"] < 1
    assert "left out 4 empty captions" in caplog.text and str(folder / "00004.png") in caplog.text

    with pytest.raises(ValueError, match="None of the 2 images"):
        image_text_retrieval(model, processor, write_caption_folder(tmp_path / "none", [[""], [" "]]), progress=False)


def test_retrieval_scores_at_most_five_captions_per_image(varied_clip_dir, tmp_path):
    model, processor = load(varied_clip_dir)
    captions = [digit_captions(i, 7 if i % 2 else 5) for i in range(6)]  # COCO has images with 6-7 captions
    folder = write_caption_folder(tmp_path / "seven", captions)
    first_five = write_caption_folder(tmp_path / "five", [c[:5] for c in captions])
    k_values = (1, 3, 10)
    default = image_text_retrieval(model, processor, folder, k_values=k_values, progress=False)
    expected = image_text_retrieval(model, processor, first_five, k_values=k_values, progress=False)
    assert default["num_texts"] == expected["num_texts"] == 30
    assert recalls(default) == pytest.approx(recalls(expected))
    every = image_text_retrieval(model, processor, folder, k_values=k_values, max_captions_per_image=0, progress=False)
    assert every["num_texts"] == 36 and recalls(every) != recalls(default)
    two = image_text_retrieval(model, processor, folder, k_values=k_values, max_captions_per_image=2, progress=False)
    assert two["num_texts"] == 12


# ---------------------------------------------------------------- class names


def test_shipped_class_names():
    names, wnids = load_class_names("imagenet"), imagenet_wnids()
    assert len(names) == len(wnids) == 1000 and len(set(wnids)) == 1000 and list(wnids) == sorted(wnids)
    assert (names[0], names[1], names[21], names[999]) == ("tench", "goldfish", "kite (bird of prey)", "toilet paper")
    assert (wnids[0], wnids[1], wnids[999]) == ("n01440764", "n01443537", "n15075141")
    # Known ILSVRC-2012 class indices: names and WordNet ids stay aligned through the list.
    for index, wnid, name in [
        (281, "n02123045", "tabby cat"),
        (340, "n02391049", "zebra"),
        (948, "n07742313", "Granny Smith apple"),
        (963, "n07873807", "pizza"),
        (985, "n11939491", "daisy"),
    ]:
        assert (wnids[index], names[index]) == (wnid, name)
    assert len(load_class_names("cifar10")) == 10 and load_class_names("cifar10")[0] == "airplane"
    cifar100 = load_class_names("cifar100")
    assert len(cifar100) == 100 and cifar100[1] == "aquarium fish" and cifar100[99] == "worm"
    assert len(IMAGENET_TEMPLATES) == 80


def test_class_names_for_folders(tmp_path):
    assert resolve_class_names(["n01440764", "n15075141"]) == (["tench", "toilet paper"], "imagenet")
    assert resolve_class_names(["big_cat", "dog"]) == (["big cat", "dog"], None)
    # A shipped set matches folders by WordNet id, label id (numeric folders sort as strings) or name.
    assert resolve_class_names(["n01443537", "1", "10", "Tench"], "imagenet")[0] == [
        "goldfish",
        "goldfish",
        "brambling",
        "tench",
    ]
    assert resolve_class_names(["aquarium_fish", "apple"], "cifar100") == (["aquarium fish", "apple"], "cifar100")
    assert resolve_class_names(None, "cifar10")[0] == list(load_class_names("cifar10"))
    with pytest.raises(ValueError, match="n99999999, zebra_crossing"):
        resolve_class_names(["n01440764", "n99999999", "zebra_crossing"], "imagenet")

    lines = tmp_path / "names.txt"
    lines.write_text("a red fish\n\na blue fish\n")
    assert resolve_class_names(["x", "y"], str(lines)) == (["a red fish", "a blue fish"], None)
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        resolve_class_names(["x", "y", "z"], lines)
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"y": "a blue fish", "x": "a red fish", "unused": "more"}))
    assert resolve_class_names(["x", "y"], mapping)[0] == ["a red fish", "a blue fish"]
    with pytest.raises(ValueError, match="folders z"):
        resolve_class_names(["x", "z"], mapping)
    with pytest.raises(FileNotFoundError, match="no_such_file.txt"):
        resolve_class_names(["x"], tmp_path / "no_such_file.txt")


def test_zero_shot_on_synset_folders_uses_openai_names_and_templates(varied_clip_dir, tmp_path):
    from hf_moe.toy_data import digit_images

    folder = tmp_path / "imagenet-val"
    images, labels = digit_images(12)
    synsets = ["n01440764", "n01443537", "n15075141"]
    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / synsets[label % 3]).mkdir(parents=True, exist_ok=True)
        image.save(folder / synsets[label % 3] / f"{i}.png")
    model, processor = load(varied_clip_dir)
    results = zero_shot_classification(model, processor, folder, return_predictions=True, progress=False)
    expected = zero_shot_classification(
        model,
        processor,
        folder,
        templates=IMAGENET_TEMPLATES,
        class_names=["tench", "goldfish", "toilet paper"],
        return_predictions=True,
        progress=False,
    )
    assert results == expected and results["num_templates"] == 80 and results["num_classes"] == 3
    folder_names = zero_shot_classification(
        model,
        processor,
        folder,
        templates=IMAGENET_TEMPLATES,
        class_names=synsets,
        return_predictions=True,
        progress=False,
    )
    assert folder_names["predictions"] != results["predictions"], "the names, not the folder ids, are prompted"


# ---------------------------------------------------------------- results file and command


def test_write_results_is_atomic(tmp_path):
    path = tmp_path / "out" / "results.json"
    write_results({"a": 1.0}, path)
    write_results({"b": torch.tensor(0.5)}, path)
    assert json.loads(path.read_text()) == {"b": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
    with pytest.raises(TypeError):
        write_results({"c": object()}, path)
    assert json.loads(path.read_text()) == {"b": 0.5}, "a failed write leaves the old file"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_evaluate_command(varied_moe_dir, class_folders, caption_folder, tmp_path, capsys):
    output = tmp_path / "zero_shot.json"
    argv = ["zero-shot", "--model", str(varied_moe_dir), "--data", str(class_folders)]
    results = evaluate_command(argv + ["--output", str(output), "--batch_size", "16", "--templates", "imagenet"])
    assert json.loads(output.read_text()) == results
    assert json.loads(capsys.readouterr().out) == results
    assert results["task"] == "zero-shot" and results["num_templates"] == 80 and results["num_images"] == 30
    assert results["options"]["batch_size"] == 16

    # Default output: inside the (local) model folder; the other spelling of the batch-size option.
    model_copy = shutil.copytree(varied_moe_dir, tmp_path / "model")
    results = evaluate_command(
        ["retrieval", "--model", str(model_copy), "--data", str(caption_folder), "--batch-size", "5"]
    )
    assert json.loads((model_copy / "eval_retrieval.json").read_text()) == results
    assert results["options"]["batch_size"] == 5 and results["num_texts"] == 24
    model, processor = load(model_copy)
    assert recalls(results) == pytest.approx(recalls(image_text_retrieval(model, processor, caption_folder)))

    with pytest.raises(ValueError, match="Unknown evaluation task"):
        evaluate_command(["segmentation", "--model", "m", "--data", "d"])
    with pytest.raises(ValueError, match="--templates"):
        evaluate_command(argv + ["--templates", "no-such-set"])


def test_evaluate_command_class_names_and_remote_code_flag(
    varied_clip_dir, class_folders, caption_folder, tmp_path, monkeypatch, capsys
):
    import transformers

    mapping = {name: f"handwritten {name}" for name in DIGIT_NAMES}
    model, processor = load(varied_clip_dir)
    expected = zero_shot_classification(model, processor, class_folders, class_names=mapping, progress=False)
    trust_remote_code = []
    from_pretrained = transformers.AutoModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        trust_remote_code.append(kwargs.get("trust_remote_code"))
        return from_pretrained(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", classmethod(spy))
    names_file = tmp_path / "names.json"
    names_file.write_text(json.dumps(mapping))
    argv = ["zero-shot", "--model", str(varied_clip_dir), "--data", str(class_folders), "--class_names"]
    output = ["--output", str(tmp_path / "out.json")]

    results = evaluate_command(argv + [str(names_file)] + output)
    assert results["top1_accuracy"] == pytest.approx(expected["top1_accuracy"])
    assert results["num_templates"] == len(DEFAULT_TEMPLATES)  # "auto" without ImageNet names
    assert results["options"]["class_names"] == str(names_file) and results["options"]["templates"] == "auto"
    assert trust_remote_code == [False] and results["options"]["trust_remote_code"] is False
    evaluate_command(argv + [str(names_file), "--trust_remote_code"] + output)
    assert trust_remote_code == [False, True]

    # Class names that do not fit the folders are refused before the model is loaded.
    with pytest.raises(ValueError, match="neither a cifar10 WordNet id, label id nor class name: eight, five"):
        evaluate_command(argv + ["cifar10"] + output)
    with pytest.raises(ValueError, match="max_captions_per_image must be >= 0"):
        evaluate_command(
            ["retrieval", "--model", str(varied_clip_dir), "--data", str(caption_folder)]
            + output
            + ["--max_captions_per_image", "-1"]
        )
    assert trust_remote_code == [False, True]
    capsys.readouterr()


def test_evaluate_command_task_reads_the_heads_a_model_was_adapted_with(varied_clip_dir, class_folders, tmp_path):
    from hf_moe.evaluation import ZERO_SHOT_HEADS_FILE, write_zero_shot_heads

    model_dir = shutil.copytree(varied_clip_dir, tmp_path / "adapted")
    names = [f"handwritten {name}" for name in DIGIT_NAMES]
    templates = ["a scan of the digit {}.", "{}, written by hand."]
    write_zero_shot_heads(model_dir, {"digits": names, "other": ["a", "b"]}, {"digits": templates, "other": ["{}"]})
    model, processor = load(model_dir)
    expected = zero_shot_classification(
        model, processor, class_folders, templates=templates, class_names=names, progress=False
    )
    argv = ["zero-shot", "--model", str(model_dir), "--data", str(class_folders), "--output", str(tmp_path / "o.json")]
    results = evaluate_command(argv + ["--task", "digits"])
    assert results["top1_accuracy"] == pytest.approx(expected["top1_accuracy"]) and results["num_templates"] == 2
    assert results["options"]["templates"] == templates and results["options"]["class_names"] == names

    with pytest.raises(ValueError, match=r"--task 'svhn' is not a task of .*\['digits', 'other'\]"):
        evaluate_command(argv + ["--task", "svhn"])
    with pytest.raises(ValueError, match="not both"):
        evaluate_command(argv + ["--task", "digits", "--templates", "default"])
    (model_dir / ZERO_SHOT_HEADS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="tta-wemoe writes it"):
        evaluate_command(argv + ["--task", "digits"])


def test_evaluate_command_retrieval_k_values(varied_clip_dir, caption_folder, tmp_path):
    argv = ["retrieval", "--model", str(varied_clip_dir), "--data", str(caption_folder)]
    results = evaluate_command(argv + ["--output", str(tmp_path / "r.json"), "--k_values", "2", "1"])
    assert sorted(key for key in results if "_R@" in key) == [
        "image_to_text_R@1", "image_to_text_R@2", "text_to_image_R@1", "text_to_image_R@2",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="--k_values must be positive"):
        evaluate_command(argv + ["--k_values", "0"])
