"""`hf-moe mode embed`: caption embeddings equal a per-caption loop, stable unique pair keys, resume, refusals."""

import io
import json
import tarfile

import datasets
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoTokenizer, BertModel, CLIPModel

from hf_moe.data import load_image_text_dataset
from hf_moe.mode import embed as embed_module
from hf_moe.mode.data import dataset_pair_keys, read_captions
from hf_moe.mode.embed import EMBED_FILE, embed_texts, main, read_shard_keys, shard_path
from hf_moe.training import JobMismatchError

from helpers import save_tiny_bert


WORDS = "a photo of the red blue green small large cat dog bird car tree on in grass road sky".split()
# MoDE's layout: shard {id} in folder {id % 100}; every shard numbers its samples from 0, so keys repeat.
SHARD_IDS = (0, 1, 100, 101)
PER_SHARD = 4


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def caption(i: int) -> str:
    words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 5)]
    return " ".join(words)


def add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 20 % 256, 0, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_mode_shards(root, shard_ids=SHARD_IDS, per_shard=PER_SHARD, empty=()) -> dict[str, str]:
    """`root/{id % 100}/{id}.tar` with json + jpg samples keyed 0000, 0001, ...; `empty` shards hold no sample.
    Returns {expected pair key: caption}."""
    expected = {}
    for n, shard_id in enumerate(shard_ids):
        folder = root / str(shard_id % 100)
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(folder / f"{shard_id}.tar", "w") as tar:
            for j in range(0 if shard_id in empty else per_shard):
                i = n * per_shard + j
                add_to_tar(tar, f"{j:04d}.json", json.dumps({"caption": caption(i)}).encode())
                add_to_tar(tar, f"{j:04d}.jpg", jpeg_bytes(i))
                expected[f"{shard_id % 100}/{shard_id}.tar/{j:04d}"] = caption(i)
    return expected


def write_image_folder(root, count=6) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    with open(root / "metadata.jsonl", "w") as metadata:
        for i in range(count):
            Image.new("RGB", (8, 8), (0, i * 30, 0)).save(root / f"{i:03d}.png")
            metadata.write(json.dumps({"file_name": f"{i:03d}.png", "text": caption(i + 50)}) + "\n")
            expected[f"{i:03d}.png"] = caption(i + 50)
    return expected


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("encoder") / "bert", hidden_size=32)


def test_tiny_bert_reads_caption_words_as_words(bert_dir):
    """The test encoder's tokenizer holds its vocabulary: no caption word becomes [UNK] (with every word [UNK], all
    captions of one length would share an embedding, and the tests below would compare next to nothing)."""
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    for i in range(20):
        tokens = tokenizer.tokenize(caption(i))
        assert tokens == caption(i).split(), tokens


def reference_embeddings(encoder_dir, texts: list[str], pooling: str, max_length: int = 77) -> torch.Tensor:
    """One caption at a time, straight from the model's outputs."""
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    model = (CLIPModel if pooling == "clip" else BertModel).from_pretrained(encoder_dir).eval()
    rows = []
    for text in texts:
        inputs = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            if pooling == "clip":
                rows.append(model.get_text_features(**inputs).pooler_output[0])
                continue
            outputs = model(**inputs)
        if pooling == "pooler":
            rows.append(outputs.pooler_output[0])
        elif pooling == "cls":
            rows.append(outputs.last_hidden_state[0, 0])
        else:
            rows.append(outputs.last_hidden_state[0].mean(0))  # one caption: no padding to mask
    return torch.stack(rows)


def read_embeddings(output_dir) -> tuple[list[str], torch.Tensor]:
    summary = json.loads((output_dir / EMBED_FILE).read_text())
    keys, tensors = [], []
    for index in range(summary["num_shards"]):
        with safe_open(str(shard_path(output_dir, index)), framework="pt") as handle:
            tensors.append(handle.get_tensor("embeddings"))
        keys += read_shard_keys(shard_path(output_dir, index))
    return keys, torch.cat(tensors)


def run_embed(data, output_dir, encoder, *extra):
    return main(
        ["--data", str(data), "--output_dir", str(output_dir), "--encoder", str(encoder), "--shard_size", "5"]
        + ["--batch_size", "3", *extra]
    )


@pytest.mark.parametrize("pooling", ["pooler", "mean"])
def test_shard_embeddings_equal_a_per_caption_loop(tmp_path, bert_dir, pooling):
    expected = write_mode_shards(tmp_path / "data")
    output = run_embed(tmp_path / "data" / "*" / "*.tar", tmp_path / "emb", bert_dir, "--pooling", pooling)
    keys, embeddings = read_embeddings(output)
    assert sorted(keys) == sorted(expected) and len(set(keys)) == len(keys) == len(SHARD_IDS) * PER_SHARD
    reference = reference_embeddings(bert_dir, [expected[key] for key in keys], pooling)
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, reference, atol=1e-5, rtol=0)
    # Stored as the encoder gives them, not normalised.
    assert not torch.allclose(embeddings.norm(dim=-1), torch.ones(len(keys)))
    summary = json.loads((output / EMBED_FILE).read_text())
    assert summary["count"] == 16 and summary["num_shards"] == 4 and summary["dim"] == 32
    assert summary["encoder"]["pooling"] == pooling


def test_keys_are_stable_across_spellings_and_locations_of_the_data(tmp_path):
    expected = write_mode_shards(tmp_path / "data")
    pairs = list(read_captions(str(tmp_path / "data" / "*" / "*.tar")))
    assert dict(pairs) == expected
    assert list(read_captions(str(tmp_path / "data" / "{0,1}" / "{0..101}.tar"))) == pairs
    (tmp_path / "data").rename(tmp_path / "moved")
    assert list(read_captions(str(tmp_path / "moved" / "*" / "*.tar"))) == pairs


@pytest.mark.parametrize("pooling", ["cls", "clip"])
def test_image_folder_embeddings(tmp_path, bert_dir, toy_clip_dir, pooling):
    expected = write_image_folder(tmp_path / "images")
    encoder = toy_clip_dir if pooling == "clip" else bert_dir
    output = run_embed(tmp_path / "images", tmp_path / "emb", encoder, "--pooling", pooling)
    keys, embeddings = read_embeddings(output)
    assert keys == sorted(expected)
    reference = reference_embeddings(encoder, [expected[key] for key in keys], pooling)
    torch.testing.assert_close(embeddings, reference, atol=1e-5, rtol=0)


class CountingEmbed:
    """Wraps `embed_texts`, counting the captions it embeds; fails on call `fail_at` (a kill mid-run)."""

    def __init__(self, monkeypatch, fail_at=None):
        self.texts, self.calls, self.fail_at = [], 0, fail_at
        monkeypatch.setattr(embed_module, "embed_texts", self)

    def __call__(self, model, tokenizer, texts, encoder_args):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.texts += texts
        return embed_texts(model, tokenizer, texts, encoder_args)


def test_resume_embeds_only_missing_shards(tmp_path, bert_dir, monkeypatch):
    expected = write_mode_shards(tmp_path / "data")
    data, output = tmp_path / "data" / "*" / "*.tar", tmp_path / "emb"
    with monkeypatch.context() as patch:
        CountingEmbed(patch, fail_at=3)
        with pytest.raises(KeyboardInterrupt):
            run_embed(data, output, bert_dir)
    assert sorted(p.name for p in output.glob("embeddings-*")) == [
        "embeddings-00000.safetensors",
        "embeddings-00001.safetensors",
    ]
    assert not (output / EMBED_FILE).exists() and not list(output.glob(".*tmp*"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in output.glob("embeddings-*")}

    counter = CountingEmbed(monkeypatch)
    run_embed(data, output, bert_dir)
    assert counter.calls == 2 and len(counter.texts) == 6  # shards 2 (5 captions) and 3 (1 caption)
    assert {p: output.joinpath(p).stat().st_mtime_ns for p in mtimes} == mtimes
    keys, complete = read_embeddings(output)
    assert sorted(keys) == sorted(expected)

    shard_path(output, 1).unlink()
    counter = CountingEmbed(monkeypatch)
    run_embed(data, output, bert_dir)
    assert counter.texts == [expected[key] for key in keys[5:10]]
    torch.testing.assert_close(read_embeddings(output)[1], complete, atol=0, rtol=0)

    counter = CountingEmbed(monkeypatch)
    run_embed(data, output, bert_dir)  # complete: nothing to do
    assert counter.calls == 0


class FakeProcess:
    """`PartialState` of process `rank` of 2; the main process lets the other one run its share at its first barrier
    (after it recorded the job), as the two would run side by side."""

    def __init__(self, rank, monkeypatch, run_peer=None):
        self.num_processes, self.process_index, self.device = 2, rank, torch.device("cpu")
        self.is_main_process = self.is_local_main_process = rank == 0
        self.monkeypatch, self.run_peer, self.waits = monkeypatch, run_peer, 0
        self.counter = None

    def enter(self):
        self.monkeypatch.setattr(embed_module, "PartialState", lambda **kwargs: self)
        self.monkeypatch.setattr("hf_moe.training._is_main_process", lambda: self.is_main_process)
        self.counter = CountingEmbed(self.monkeypatch)

    def wait_for_everyone(self):
        self.waits += 1
        if self.run_peer is not None and self.waits == 1:
            self.run_peer()
            self.enter()


def test_processes_share_the_shards(tmp_path, bert_dir, monkeypatch):
    """With 2 processes, process k embeds shards k, k + 2, ...; the result equals a 1-process run."""
    write_mode_shards(tmp_path / "data")
    data, output = tmp_path / "data" / "*" / "*.tar", tmp_path / "two"
    single = run_embed(data, tmp_path / "single", bert_dir)
    peer = FakeProcess(1, monkeypatch)

    def run_peer():
        peer.enter()
        run_embed(data, output, bert_dir)
        assert sorted(p.name for p in output.glob("embeddings-*")) == [
            "embeddings-00001.safetensors",
            "embeddings-00003.safetensors",
        ]

    main_process = FakeProcess(0, monkeypatch, run_peer)
    main_process.enter()
    run_embed(data, output, bert_dir)
    assert peer.counter.calls == 2 and main_process.counter.calls == 2
    assert read_embeddings(output)[0] == read_embeddings(single)[0]
    torch.testing.assert_close(read_embeddings(output)[1], read_embeddings(single)[1], atol=0, rtol=0)


def test_differing_rerun_is_refused_naming_the_option(tmp_path, bert_dir):
    write_mode_shards(tmp_path / "data")
    data, output = tmp_path / "data" / "*" / "*.tar", tmp_path / "emb"
    run_embed(data, output, bert_dir)
    with pytest.raises(JobMismatchError, match=r"--max_length: 77 \(recorded\) vs 8 \(now\)"):
        run_embed(data, output, bert_dir, "--max_length", "8")
    # Changed data is refused too.
    with tarfile.open(tmp_path / "data" / "0" / "0.tar", "a") as tar:
        add_to_tar(tar, "0099.json", json.dumps({"caption": "a cat"}).encode())
        add_to_tar(tar, "0099.jpg", jpeg_bytes(99))
    with pytest.raises(JobMismatchError, match="data: "):
        run_embed(data, output, bert_dir)


def test_data_without_captions_is_refused_and_nothing_written(tmp_path, bert_dir):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": ""}) + "\n")
    with pytest.raises(ValueError, match=r"images holds no pair with a caption"):
        run_embed(tmp_path / "images", tmp_path / "emb", bert_dir)
    assert not (tmp_path / "emb").exists()


def test_output_inside_the_data_is_refused(tmp_path, bert_dir):
    write_image_folder(tmp_path / "images")
    with pytest.raises(ValueError, match="would destroy that input"):
        run_embed(tmp_path / "images", tmp_path / "images", bert_dir)


def write_img2dataset(root, count=5) -> dict[str, str]:
    expected = {}
    for i in range(count):
        folder = root / f"{i // 3:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (0, 0, i * 40)).save(folder / f"{i:09d}.jpg")
        (folder / f"{i:09d}.txt").write_text(caption(i + 80))
        expected[f"{folder.name}/{i:09d}"] = caption(i + 80)
    return expected


@pytest.mark.parametrize("layout", ["shards", "img2dataset", "imagefolder"])
def test_embedding_and_training_see_the_same_pair_keys(tmp_path, layout, monkeypatch):
    """The keys of the embedding pass (streamed captions, no image decoded) are those `fine_labels_of` computes
    from the training dataset, for every layout."""
    writers = {"shards": write_mode_shards, "img2dataset": write_img2dataset, "imagefolder": write_image_folder}
    expected = writers[layout](tmp_path / "data")
    data = tmp_path / "data" / "*" / "*.tar" if layout == "shards" else tmp_path / "data"
    with monkeypatch.context() as patch:
        patch.setattr(Image, "open", lambda *args, **kwargs: pytest.fail("the caption pass decoded an image"))
        assert dict(read_captions(str(data))) == expected
    training = load_image_text_dataset(str(data), streaming=False)
    assert sorted(dataset_pair_keys(training)) == sorted(expected)
