"""`hf-moe mode cluster`: centers, fine -> coarse map and assignments checked against direct computations; resume,
refusals with nothing written, and `fine_labels_of` for training."""

import json
import shutil

import datasets
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_mode_embed import write_image_folder, write_mode_shards

from hf_moe.clustering import balanced_size_bounds
from hf_moe.data import load_image_text_dataset
from hf_moe.mode import cluster as cluster_module
from hf_moe.mode.cluster import CENTERS_FILE, CLUSTERS_FILE, main
from hf_moe.mode.data import fine_labels_of
from hf_moe.mode.embed import read_shard_keys, shard_path
from hf_moe.training import JobMismatchError

from helpers import save_tiny_bert


NUM_FINE, NUM_EXPERTS, TOLERANCE = 4, 2, 0.25


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def cluster_argv(data, output_dir, *extra):
    return ["--data", str(data), "--output_dir", str(output_dir), "--num_experts", str(NUM_EXPERTS)] + [
        "--num_fine_clusters",
        str(NUM_FINE),
        "--tolerance",
        str(TOLERANCE),
        *extra,
    ]


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """Shards in MoDE's layout, clustered end to end: embedded into DIR/embeddings first by a tiny BERT."""
    root = tmp_path_factory.mktemp("mode")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf_datasets_cache")
        expected = write_mode_shards(root / "data")
        bert = save_tiny_bert(root / "bert", hidden_size=32)
        data = root / "data" / "*" / "*.tar"
        output = main(cluster_argv(data, root / "clusters", "--encoder", str(bert), "--shard_size", "5"))
    return {"data": data, "output": output, "embeddings": output / "embeddings", "captions": expected}


def read_embeddings(embeddings_dir):
    keys, tensors = [], []
    for index in range(json.loads((embeddings_dir / "embed.json").read_text())["num_shards"]):
        keys += read_shard_keys(shard_path(embeddings_dir, index))
        tensors.append(load_file(shard_path(embeddings_dir, index))["embeddings"])
    return keys, torch.cat(tensors)


def read_parts(output_dir):
    parts = sorted((output_dir / "assignments").glob("part-*.parquet"))
    tables = [pq.read_table(part).to_pydict() for part in parts]
    return {column: [value for table in tables for value in table[column]] for column in ("key", "fine", "coarse")}


def test_assignments_are_the_nearest_fine_centers(clustered):
    output = clustered["output"]
    keys, embeddings = read_embeddings(clustered["embeddings"])
    assert sorted(keys) == sorted(clustered["captions"])
    centers = load_file(output / CENTERS_FILE)
    fine_centers, coarse_centers, fine_to_coarse = (
        centers["fine_centers"],
        centers["coarse_centers"],
        centers["fine_to_coarse"],
    )
    assert fine_centers.shape == (NUM_FINE, 32) and fine_centers.dtype == torch.float32
    assert coarse_centers.shape == (NUM_EXPERTS, 32) and fine_to_coarse.dtype == torch.int64
    # Each fine cluster belongs to the expert of its nearest coarse center.
    assert fine_to_coarse.tolist() == torch.cdist(fine_centers, coarse_centers).argmin(-1).tolist()

    parts = read_parts(output)
    assert len(list((output / "assignments").glob("part-*.parquet"))) == 4  # one per embedding shard
    assert parts["key"] == keys
    normalised = embeddings / embeddings.norm(dim=-1, keepdim=True)
    nearest = torch.cdist(normalised, fine_centers).argmin(-1)
    assert parts["fine"] == nearest.tolist()
    assert parts["coarse"] == fine_to_coarse[nearest].tolist()
    schema = pq.read_schema(output / "assignments" / "part-00000.parquet")
    assert str(schema.field("fine").type) == "int32" and str(schema.field("coarse").type) == "int32"

    summary = json.loads((output / CLUSTERS_FILE).read_text())
    assert summary["num_fine_clusters"] == NUM_FINE and summary["num_experts"] == NUM_EXPERTS
    assert summary["encoder"]["pooling"] == "pooler" and summary["encoder"]["max_length"] == 77
    assert summary["encoder"]["name_or_path"].endswith("bert")
    assert (summary["seed"], summary["tolerance"], summary["fine_sample_size"], summary["num_pairs"]) == (
        0,
        TOLERANCE,
        16,
        16,
    )
    assert summary["expert_sizes"] == torch.bincount(fine_to_coarse[nearest], minlength=NUM_EXPERTS).tolist()
    fine_sizes = torch.bincount(nearest, minlength=NUM_FINE)
    assert summary["fine_sizes_min_max"] == [fine_sizes.min().item(), fine_sizes.max().item()]
    # The balanced k-means of the sample keeps every fine cluster within the tolerance of 16 / 4 pairs.
    low, high = summary["sample_fine_sizes_min_max"]
    bounds = balanced_size_bounds(16, NUM_FINE, TOLERANCE)
    assert bounds[0] <= low <= high <= bounds[1]


def test_fine_labels_of_training_rows(clustered, tmp_path):
    dataset = load_image_text_dataset(str(clustered["data"]), streaming=False)
    labels = fine_labels_of(dataset, clustered["output"])
    parts = read_parts(clustered["output"])
    by_key = dict(zip(parts["key"], parts["fine"]))
    expected = [
        by_key[f"{url.split('/')[-2]}/{url.split('/')[-1]}/{key}"]
        for url, key in zip(dataset["__url__"], dataset["__key__"])
    ]
    assert labels.dtype == torch.int64 and labels.tolist() == expected

    write_image_folder(tmp_path / "images")
    other = load_image_text_dataset(tmp_path / "images")
    with pytest.raises(ValueError, match=r"6 of 6 rows are not in the assignments .* e\.g\. pair key '000\.png'"):
        fine_labels_of(other, clustered["output"])


class Killed(Exception):
    pass


def test_resume_reuses_centers_and_complete_parts(clustered, tmp_path, monkeypatch):
    argv = cluster_argv(clustered["data"], tmp_path / "clusters", "--embeddings", str(clustered["embeddings"]))
    write_part, written = cluster_module._write_part, []

    def killed_on_third_part(path, *args):
        if len(written) == 2:
            raise Killed()
        written.append(path.name)
        write_part(path, *args)

    monkeypatch.setattr(cluster_module, "_write_part", killed_on_third_part)
    with pytest.raises(Killed):
        main(argv)
    assert not (tmp_path / "clusters" / CLUSTERS_FILE).exists()
    outputs = (tmp_path / "clusters").rglob("*")
    mtimes = {p: p.stat().st_mtime_ns for p in outputs if p.is_file() and p.name != "hf_moe_job.json"}
    assert sorted(p.name for p in mtimes) == [CENTERS_FILE, "part-00000.parquet", "part-00001.parquet"]

    calls = []
    monkeypatch.setattr(cluster_module, "cluster", lambda *a, **k: calls.append(a))
    written.clear()
    monkeypatch.setattr(
        cluster_module, "_write_part", lambda path, *args: (written.append(path.name), write_part(path, *args))
    )
    main(argv)
    assert calls == [] and written == ["part-00002.parquet", "part-00003.parquet"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # Same embeddings, same seed: the same clustering as the run that embedded them itself.
    assert read_parts(tmp_path / "clusters") == read_parts(clustered["output"])
    for name, tensor in load_file(clustered["output"] / CENTERS_FILE).items():
        torch.testing.assert_close(load_file(tmp_path / "clusters" / CENTERS_FILE)[name], tensor, atol=0, rtol=0)


def test_differing_rerun_is_refused_naming_the_option(clustered):
    with pytest.raises(JobMismatchError, match=r"--seed: 0 \(recorded\) vs 1 \(now\)"):
        main(cluster_argv(clustered["data"], clustered["output"], "--seed", "1", "--shard_size", "5"))
    with pytest.raises(JobMismatchError, match=r"--num_experts: 2 \(recorded\) vs 3 \(now\)"):
        main(cluster_argv(clustered["data"], clustered["output"], "--shard_size", "5", "--num_experts", "3"))


def broken_embeddings(clustered, tmp_path, problem):
    """A copy of the embeddings with shard 2 emptied or of another dimension."""
    embeddings = tmp_path / "embeddings"
    shutil.copytree(clustered["embeddings"], embeddings)
    path = shard_path(embeddings, 2)
    rows = (0, 32) if problem == "empty" else (5, 16)
    keys = read_shard_keys(path)[: rows[0]]
    save_file({"embeddings": torch.randn(rows)}, path, metadata={"keys": json.dumps(keys)})
    return embeddings


@pytest.mark.parametrize(
    "case, error",
    [
        ("more_experts_than_fine", r"--num_experts 5 exceeds --num_fine_clusters 4"),
        ("sample_too_small", r"--num_fine_clusters 4 exceeds the 3 sampled pairs \(16 pairs"),
        ("empty", r"Embedding shard .*embeddings-00002\.safetensors is empty"),
        ("dimension", r"Embedding shard .*embeddings-00002\.safetensors has dimension 16, but .*00000.* has 32"),
        ("other_data", r"were not computed from"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(clustered, tmp_path, case, error):
    embeddings, data, extra = clustered["embeddings"], clustered["data"], []
    if case == "more_experts_than_fine":
        extra = ["--num_experts", "5"]
    elif case == "sample_too_small":
        extra = ["--fine_sample_size", "3"]
    elif case in ("empty", "dimension"):
        embeddings = broken_embeddings(clustered, tmp_path, case)
    else:
        write_image_folder(tmp_path / "images")
        data = tmp_path / "images"
    with pytest.raises(ValueError, match=error):
        main(cluster_argv(data, tmp_path / "clusters", "--embeddings", str(embeddings), *extra))
    assert not (tmp_path / "clusters").exists()
