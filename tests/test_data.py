"""Image-caption loading (imagefolder, img2dataset, webdataset shards), skipping of bad rows, and the collator."""

import copy
import io
import json
import logging
import tarfile

import datasets
import pytest
import torch
from PIL import Image
from transformers import CLIPProcessor

from hf_moe.data import (
    MISSING_CAPTION,
    TRUNCATED_SHARD,
    UNREADABLE_IMAGE,
    ImageTextCollator,
    add_index_column,
    load_image_text_dataset,
    validate_image_text_dataset,
)
from hf_moe.toy_data import digit_caption, digit_images, save_digit_caption_folder


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep the Arrow caches datasets writes for each new data folder out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


@pytest.fixture(scope="module")
def processor(toy_clip_dir):
    return CLIPProcessor.from_pretrained(toy_clip_dir)


def image_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, num_shards=2, per_shard=4, corrupt=(), empty=(), uncaptioned=(), json_captions=False):
    """webdataset shards `shard-0000{s}.tar` of digit samples `{key}.png` + `{key}.txt` (or `{key}.json` with a
    `caption`); the samples in `corrupt` get garbage image bytes, those in `empty` an empty caption, those in
    `uncaptioned` no caption file. Returns the captions."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images(num_shards * per_shard)
    for shard in range(num_shards):
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w") as tar:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                key = f"{i:09d}"
                add_to_tar(tar, f"{key}.png", b"not a png" if i in corrupt else image_bytes(images[i]))
                caption = "" if i in empty else digit_caption(labels[i], 0)
                if i in uncaptioned:
                    continue
                if json_captions:
                    add_to_tar(tar, f"{key}.json", json.dumps({"caption": caption, "key": key}).encode())
                else:
                    add_to_tar(tar, f"{key}.txt", caption.encode())
    return [digit_caption(label, 0) for label in labels]


def write_img2dataset(folder, count=6, per_folder=4):
    """img2dataset's "files" output: `0000{k}/{key}.jpg`, `.txt` and `.json`, plus its top-level stats files."""
    images, labels = digit_images(count)
    for i, (image, label) in enumerate(zip(images, labels)):
        sub = folder / f"{i // per_folder:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        image.save(sub / f"{i:09d}.jpg")
        (sub / f"{i:09d}.txt").write_text(digit_caption(label, 1) + "\n")
        (sub / f"{i:09d}.json").write_text(json.dumps({"key": f"{i:09d}", "status": "success", "width": 32}))
        (folder / f"{sub.name}_stats.json").write_text("{}")
    return [digit_caption(label, 1) for label in labels]


def test_imagefolder_loads_rows_and_captions(tmp_path):
    folder = save_digit_caption_folder(tmp_path / "digits", count=5)
    expected = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    dataset = load_image_text_dataset(folder)
    assert isinstance(dataset, datasets.Dataset) and len(dataset) == 5
    assert dataset["text"] == [row["text"] for row in expected]
    assert dataset["label"] == [row["label"] for row in expected]  # other metadata columns are kept
    assert isinstance(dataset[0]["image"], Image.Image) and dataset[0]["image"].size == (32, 32)


def test_imagefolder_with_other_caption_column(tmp_path):
    folder = save_digit_caption_folder(tmp_path / "digits", count=3)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").unlink()
    with open(folder / "metadata.csv", "w") as metadata:
        metadata.write("file_name,caption\n" + "".join(f"{row['file_name']},{row['text']}\n" for row in rows))
    dataset = load_image_text_dataset(folder, text_column="caption")
    assert dataset["text"] == [row["text"] for row in rows]
    with pytest.raises(ValueError, match="no text column 'text'"):
        load_image_text_dataset(folder)


def test_img2dataset_folder_loads_rows_and_captions(tmp_path):
    captions = write_img2dataset(tmp_path / "i2d", count=6)
    dataset = load_image_text_dataset(tmp_path / "i2d")
    assert isinstance(dataset, datasets.Dataset) and len(dataset) == 6
    assert dataset["text"] == captions  # the .txt captions, trailing newline stripped
    assert dataset["__key__"][4] == "00001/000000004"
    assert dataset[4]["json"]["status"] == "success"
    assert isinstance(dataset[4]["image"], Image.Image)


def test_webdataset_shards_load_map_style(tmp_path):
    captions = write_shards(tmp_path / "shards")
    for data in (tmp_path / "shards", str(tmp_path / "shards" / "shard-{00000..00001}.tar")):
        dataset = load_image_text_dataset(data, streaming=False)
        assert isinstance(dataset, datasets.Dataset)
        assert dataset["text"] == captions
        assert dataset["__key__"] == [f"{i:09d}" for i in range(8)]
        assert isinstance(dataset[0]["image"], Image.Image)


def test_webdataset_shards_stream_by_default(tmp_path):
    captions = write_shards(tmp_path / "shards", json_captions=True)
    dataset = load_image_text_dataset(str(tmp_path / "shards" / "shard-*.tar"))
    assert isinstance(dataset, datasets.IterableDataset) and dataset.num_shards == 2
    rows = list(dataset)
    assert [row["text"] for row in rows] == captions  # from the .json's `caption`
    assert all(isinstance(row["image"], Image.Image) and row["image"].size == (32, 32) for row in rows)
    assert [row["text"] for row in dataset.take(3)] == captions[:3]  # iterates again, lazily


def test_bad_rows_are_skipped_and_counted_map_style(tmp_path, caplog):
    folder = save_digit_caption_folder(tmp_path / "digits", count=6)
    (folder / "00002.png").write_bytes(b"garbage, not an image")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[4]["text"] = ""
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    dataset, report = validate_image_text_dataset(load_image_text_dataset(folder, validate=False))
    assert (report.num_rows, report.num_skipped, report.num_kept) == (6, 2, 4)
    assert report.skipped == {UNREADABLE_IMAGE: 1, MISSING_CAPTION: 1}
    assert report.examples[UNREADABLE_IMAGE] == [str(folder / "00002.png")]
    assert dataset["text"] == [rows[i]["text"] for i in (0, 1, 3, 5)]
    assert all(isinstance(row["image"], Image.Image) for row in dataset)

    with caplog.at_level(logging.WARNING, logger="hf_moe.data"):
        assert len(load_image_text_dataset(folder)) == 4
    assert "skipped 2 of 6 rows" in caplog.text
    assert f"1 {UNREADABLE_IMAGE}" in caplog.text and f"1 {MISSING_CAPTION}" in caplog.text


def test_bad_rows_are_skipped_and_counted_streaming(tmp_path, caplog):
    # A sample without caption file must come after the first 5, from which datasets infers the fields.
    captions = write_shards(tmp_path / "shards", corrupt={2}, empty={5}, uncaptioned={6})
    dataset, report = validate_image_text_dataset(load_image_text_dataset(tmp_path / "shards", validate=False))
    with caplog.at_level(logging.WARNING, logger="hf_moe.data"):
        rows = list(dataset)
    assert [row["text"] for row in rows] == [captions[i] for i in (0, 1, 3, 4, 7)]
    assert all(isinstance(row["image"], Image.Image) for row in rows)
    assert report.num_rows == 8 and report.skipped == {UNREADABLE_IMAGE: 1, MISSING_CAPTION: 2}
    assert "shard-00000.tar:000000002 (unreadable image)" in caplog.text
    assert "skipped 2 of 6 rows" in caplog.text  # running totals in the log


def sample_extents(shard) -> dict[str, tuple[int, int]]:
    """Per sample key of a tar shard: (offset of its first header, offset where its last member's data ends)."""
    extents = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key = member.name.split(".")[0]
            start, _ = extents.get(key, (member.offset, 0))
            extents[key] = (start, member.offset_data + member.size)
    return extents


# "half": the brief's cut, mid-way through a member's data (tarfile raises). "sample_boundary": exactly at a sample's
# first header, which tarfile reads as a complete archive (no error at all).
@pytest.mark.parametrize("cut", ["half", "sample_boundary"])
@pytest.mark.parametrize("streaming", [True, False])
def test_truncated_shard_is_skipped_and_counted(tmp_path, caplog, streaming, cut):
    captions = write_shards(tmp_path / "shards", num_shards=3, per_shard=6)
    shard = tmp_path / "shards" / "shard-00001.tar"
    data, extents = shard.read_bytes(), sample_extents(shard)
    size = len(data) // 2 if cut == "half" else extents["000000010"][0]
    shard.write_bytes(data[:size])
    complete = [i for i in range(6, 12) if extents[f"{i:09d}"][1] <= size]
    assert 0 < len(complete) < 6 and (cut == "half") == (size not in [start for start, _ in extents.values()])

    dataset, report = validate_image_text_dataset(
        load_image_text_dataset(tmp_path / "shards", streaming=streaming, validate=False)
    )
    with caplog.at_level(logging.WARNING, logger="hf_moe.data"):
        rows = list(dataset)  # the shard after the damaged one is still read
    kept = [*range(6), *complete, *range(12, 18)]
    assert [row["__key__"] for row in rows] == [f"{i:09d}" for i in kept]
    assert [row["text"] for row in rows] == [captions[i] for i in kept]
    assert all(isinstance(row["image"], Image.Image) for row in rows)
    assert report.skipped == {TRUNCATED_SHARD: 1} and report.num_kept == len(kept)
    where = f"{shard}: the rest of the shard after sample {complete[-1]:09d}"
    assert report.examples[TRUNCATED_SHARD] == [where]
    if streaming:  # map-style data is read (and its damage logged) while loading, before the capture
        assert f"Skipping {where} ({TRUNCATED_SHARD})" in caplog.text


def test_first_shard_truncated_before_its_fields_are_known(tmp_path):
    write_shards(tmp_path / "shards", num_shards=2, per_shard=6)
    shard = tmp_path / "shards" / "shard-00000.tar"
    shard.write_bytes(shard.read_bytes()[: sample_extents(shard)["000000002"][0] + 700])
    with pytest.raises(ValueError, match=r"first shard .*shard-00000\.tar is truncated or corrupt"):
        load_image_text_dataset(tmp_path / "shards")


def test_collator_truncates_pads_and_resizes(processor):
    long_caption = " ".join(["a scanned digit drawn with a pen"] * 20)  # ~640 tokens: one per letter
    rows = [
        {"image": Image.new("L", (40, 30)), "text": "a"},
        {"image": Image.new("RGBA", (20, 50)), "text": [long_caption, "second caption, unused"]},
    ]
    batch = ImageTextCollator(processor)(rows)
    crop = processor.image_processor.crop_size
    assert batch["pixel_values"].shape == (2, 3, crop["height"], crop["width"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 77)
    assert batch["attention_mask"][1].all()
    assert batch["attention_mask"][0].sum() < 10 and not batch["attention_mask"][0, -1]  # padded with zeros
    assert "index" not in batch

    assert ImageTextCollator(processor, max_length=16)(rows)["input_ids"].shape == (2, 16)
    assert ImageTextCollator(processor)(rows[:1])["input_ids"].shape[1] < 10  # padding to the longest only

    long_clip = copy.deepcopy(processor)
    long_clip.tokenizer.model_max_length = 248  # as a Long-CLIP model's tokenizer says
    assert ImageTextCollator(long_clip)(rows)["input_ids"].shape == (2, 248)


def test_index_column_reaches_the_batch(tmp_path, processor):
    dataset = add_index_column(load_image_text_dataset(save_digit_caption_folder(tmp_path / "digits", count=4)))
    assert dataset["index"] == [0, 1, 2, 3]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=False, collate_fn=ImageTextCollator(processor))
    assert [batch["index"].tolist() for batch in loader] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="already has a column 'index'"):
        add_index_column(dataset)


def test_unknown_layout_raises_naming_the_path(tmp_path):
    folder = tmp_path / "just_images"
    folder.mkdir()
    digit_images(1)[0][0].save(folder / "lonely.png")
    with pytest.raises(ValueError, match="just_images"):
        load_image_text_dataset(folder)
    with pytest.raises(ValueError, match="missing_folder"):
        load_image_text_dataset(tmp_path / "missing_folder")
    with pytest.raises(ValueError, match="No tar shard matches"):
        load_image_text_dataset(str(tmp_path / "shards-{000..002}.tar"))
