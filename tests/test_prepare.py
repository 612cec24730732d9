"""`hf-moe prepare coco|flickr30k`: small files written in the official annotation formats, turned into captioned
image folders that the data loader and retrieval evaluation read."""

import json

import datasets
import pytest

from hf_moe.cli import main as cli_main
from hf_moe.data import load_image_text_dataset
from hf_moe.evaluation import evaluate_command
from hf_moe.prepare import main
from hf_moe.toy_data import digit_caption, digit_images


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def save_images(folder, file_names):
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images(len(file_names))
    for image, file_name in zip(images, file_names):
        image.save(folder / file_name)
    return labels


def captions_for(label: int, count: int) -> list[str]:
    return [f"{digit_caption(label, j)}, caption {j}" for j in range(count)]


@pytest.fixture
def coco(tmp_path):
    """`captions_val2017.json` in COCO's format (annotations interleaved across images, a caption with a stray
    newline, one image without captions, 6-7 captions for some) and its image folder."""
    file_names = [f"{image_id:012d}.jpg" for image_id in (139, 285, 632, 724)]
    labels = save_images(tmp_path / "val2017", file_names)
    expected = {139: captions_for(labels[0], 5), 285: captions_for(labels[1], 7), 632: captions_for(labels[2], 6)}
    annotations = []
    for j in range(7):  # interleaved, as in the official file
        for image_id, captions in expected.items():
            if j < len(captions):
                caption = captions[j] + (" \n" if j == 2 else "")
                annotations.append({"image_id": image_id, "id": len(annotations) + 1, "caption": caption})
    content = {
        "info": {"description": "COCO 2017 Dataset"},
        "images": [
            {"id": int(name[:12]), "file_name": name, "height": 32, "width": 32, "license": 1} for name in file_names
        ],
        "annotations": annotations,
    }
    path = tmp_path / "annotations" / "captions_val2017.json"
    path.parent.mkdir()
    path.write_text(json.dumps(content))
    return path, tmp_path / "val2017", expected


@pytest.fixture
def flickr(tmp_path):
    """`results_20130124.token` (`<image>.jpg#<n>\\t<caption>`, one image's lines out of order) and
    `flickr30k-images/`."""
    file_names = ["1000092795.jpg", "10002456.jpg", "1000268201.jpg"]
    labels = save_images(tmp_path / "flickr30k-images", file_names)
    expected = {name: captions_for(label, 5) for name, label in zip(file_names, labels)}
    lines = [f"{name}#{n}\t{captions[n]}" for name, captions in expected.items() for n in range(5)]
    lines[5:10] = lines[5:10][::-1]
    path = tmp_path / "results_20130124.token"
    path.write_text("\n".join(lines) + "\n")
    return path, tmp_path / "flickr30k-images", expected


def read_metadata(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_prepare_coco_then_evaluate_retrieval(coco, toy_clip_dir, tmp_path, capsys):
    annotations, images, expected = coco
    output = tmp_path / "coco-val2017"
    main(["coco", "--annotations", str(annotations), "--images", str(images), "--output_dir", str(output)])

    rows = read_metadata(output)
    assert [row["image_id"] for row in rows] == [139, 285, 632]  # 724 has no caption: left out
    assert [row["text"] for row in rows] == list(expected.values())  # all captions, in order, whitespace cleaned
    assert sorted(path.name for path in output.iterdir()) == sorted(
        [row["file_name"] for row in rows] + ["metadata.jsonl"]
    )
    for row in rows:  # linked, not copied
        assert (output / row["file_name"]).is_symlink()
        assert (output / row["file_name"]).resolve() == (images / row["file_name"]).resolve()

    dataset = load_image_text_dataset(output)
    assert dataset["text"] == list(expected.values()) and dataset[0]["image"].size == (32, 32)

    results = evaluate_command(
        ["retrieval", "--model", str(toy_clip_dir), "--data", str(output), "--output", str(tmp_path / "eval.json")]
    )
    assert results["num_images"] == 3 and results["num_texts"] == 15  # at most 5 captions per image
    assert results["text_to_image_R@5"] == 1.0  # 3 images
    every = evaluate_command(
        [
            "retrieval",
            "--model",
            str(toy_clip_dir),
            "--data",
            str(output),
            "--output",
            str(tmp_path / "eval.json"),
            "--max_captions_per_image",
            "0",
        ]
    )
    assert every["num_texts"] == 18
    capsys.readouterr()


def test_prepare_flickr30k_orders_captions_and_copies_on_request(flickr, tmp_path):
    annotations, images, expected = flickr
    output = tmp_path / "flickr30k"
    argv = ["flickr30k", "--annotations", str(annotations), "--images", str(images), "--output_dir", str(output)]
    main(argv + ["--copy_images"])
    rows = read_metadata(output)
    assert {row["file_name"]: row["text"] for row in rows} == expected
    assert [row["image_id"] for row in rows] == ["1000092795", "10002456", "1000268201"]
    assert not any((output / row["file_name"]).is_symlink() for row in rows)
    assert (output / rows[0]["file_name"]).read_bytes() == (images / rows[0]["file_name"]).read_bytes()
    assert load_image_text_dataset(output)["text"] == list(expected.values())

    with pytest.raises(FileExistsError, match="not empty"):
        main(argv)
    main(argv + ["--overwrite"])
    assert (output / rows[0]["file_name"]).is_symlink()


def test_prepare_refuses_missing_images_unless_told(flickr, tmp_path, capsys):
    annotations, images, expected = flickr
    (images / "10002456.jpg").unlink()
    output = tmp_path / "flickr30k"
    argv = [
        "prepare",
        "flickr30k",
        "--annotations",
        str(annotations),
        "--images",
        str(images),
        "--output-dir",
        str(output),
    ]
    assert cli_main(argv) == 1
    error = capsys.readouterr().err
    assert "1 of the 3 images" in error and "10002456.jpg" in error and "--skip_missing" in error
    assert len(error.strip().splitlines()) == 1 and not output.exists()
    assert not list(tmp_path.glob(".flickr30k*")), "no temporary folder is left behind"

    assert cli_main(argv + ["--skip_missing"]) == 0
    assert [row["file_name"] for row in read_metadata(output)] == ["1000092795.jpg", "1000268201.jpg"]


def test_prepare_refuses_bad_annotations_before_writing(flickr, coco, tmp_path):
    annotations, images, _ = flickr
    output = tmp_path / "out"
    bad = tmp_path / "bad.token"
    bad.write_text(annotations.read_text() + "1000092795.jpg Two dogs, no tab and no number\n")
    with pytest.raises(ValueError, match=r"bad\.token:16 is not a Flickr30k caption line"):
        main(["flickr30k", "--annotations", str(bad), "--images", str(images), "--output_dir", str(output)])

    coco_annotations, coco_images, _ = coco
    content = json.loads(coco_annotations.read_text())
    content["annotations"].append({"image_id": 999, "id": 1000, "caption": "an orphan caption"})
    orphan = tmp_path / "orphan.json"
    orphan.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"annotations\[18\] refers to image_id 999"):
        main(["coco", "--annotations", str(orphan), "--images", str(coco_images), "--output_dir", str(output)])
    not_coco = tmp_path / "instances.json"
    not_coco.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        main(["coco", "--annotations", str(not_coco), "--images", str(coco_images), "--output_dir", str(output)])
    with pytest.raises(ValueError, match="not valid JSON"):
        main(["coco", "--annotations", str(annotations), "--images", str(coco_images), "--output_dir", str(output)])
    with pytest.raises(ValueError, match="holds the input"):  # --overwrite would delete the images
        main(
            [
                "coco",
                "--annotations",
                str(coco_annotations),
                "--images",
                str(coco_images),
                "--output_dir",
                str(tmp_path),
                "--overwrite",
            ]
        )
    with pytest.raises(ValueError, match="Unknown dataset 'nocaps'"):
        main(["nocaps", "--annotations", str(annotations)])
    assert not output.exists()
