"""Issue 14, MoDE: `mode build` checks its experts against their `mode train-expert` job records (index, clusters,
no expert twice) and compares only real architecture; models of the wrong kind, wrong encoder / pooling pairs,
another data set's clusters, an empty `--embeddings` folder and non-finite embeddings are refused by name, before
anything is written."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file
from test_mode_build import write_clusters
from test_mode_train_expert import argv as expert_argv
from test_mode_train_expert import inputs  # noqa: F401  (module fixture: data and clusters for train-expert)
from transformers import CLIPModel

from hf_moe.conversion import build_mode
from hf_moe.conversion.build_mode import clusters_id
from hf_moe.mode.cluster import main as cluster_main
from hf_moe.mode.data import ClustersMismatchError
from hf_moe.mode.embed import main as embed_main
from hf_moe.mode.embed import shard_path
from hf_moe.mode.train_expert import main as train_expert_main
from hf_moe.toy import save_toy_clip
from hf_moe.training import JOB_FILE, input_fingerprint

from helpers import save_tiny_bert


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Two toy CLIP experts, a tiny BERT clustering encoder and two different clusters folders for it."""
    root = tmp_path_factory.mktemp("mode_reliability")
    bert = save_tiny_bert(root / "bert", hidden_size=32)
    experts = [save_toy_clip(root / f"expert{k}", seed=k) for k in range(2)]
    clusters = write_clusters(root / "clusters", dim=32, encoder=bert)
    other = write_clusters(
        root / "other_clusters", dim=32, encoder=bert, fine_to_coarse=torch.tensor([1, 1, 1, 0, 0, 0])
    )
    return {"root": root, "bert": bert, "experts": experts, "clusters": clusters, "other": other}


def record_job(expert, index, clusters, complete=True, **extra_options):
    """The job record `hf-moe mode train-expert` leaves in an expert's folder."""
    options = {"expert": index, "other_share": 0.02, "clusters_id": clusters_id(clusters), **extra_options}
    record = {"command": "mode train-expert", "options": options, "inputs": {}, "complete": complete}
    (expert / JOB_FILE).write_text(json.dumps(record))


def copy_expert(expert, destination):
    shutil.copytree(expert, destination)
    return destination


def assert_nothing_written(output):
    """No output folder, no temporary sibling (the `.NAME.lock` of `hf_moe.fileio.OutputDirLock` may stay)."""
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}") and p.suffix != ".lock"]


@pytest.fixture
def recorded_experts(parts, tmp_path):
    """Copies of the two experts whose job records say expert 0 and 1 of `parts["clusters"]`."""
    experts = [copy_expert(e, tmp_path / f"e{k}") for k, e in enumerate(parts["experts"])]
    for k, expert in enumerate(experts):
        record_job(expert, k, parts["clusters"])
    return experts


def test_experts_matching_their_records_and_a_copy_of_their_clusters_build(parts, recorded_experts, tmp_path):
    # copytree without copystat: the copy has other paths and times, but the same content (and clusters_id).
    clusters = tmp_path / "copied_clusters"
    shutil.copytree(parts["clusters"], clusters, copy_function=shutil.copyfile)
    assert input_fingerprint(clusters) != input_fingerprint(parts["clusters"])
    assert clusters_id(clusters) == clusters_id(parts["clusters"])
    assert clusters_id(parts["other"]) != clusters_id(parts["clusters"])
    build_mode(recorded_experts, clusters, tmp_path / "out", return_model=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "case, match",
    [
        ("swapped", r"Expert '.*e1' is given as expert 0, but .*e1/hf_moe_job\.json records 'expert' 1"),
        ("same_folder_twice", r"Expert folder '.*e0' is given twice \(as expert 0 and expert 1\)"),
        ("same_expert_copied", r"Experts '.*e0' and '.*e0_copy' were both trained as expert 0"),
        ("other_clusters", r"Expert '.*e0' was trained on other clusters: .*e0/hf_moe_job\.json records 'clusters_id'"),
        ("unfinished", r"Expert '.*e1' is not finished: its job record .*e1/hf_moe_job\.json is not marked complete"),
    ],
)
def test_experts_mismatched_to_their_clusters_are_refused_before_anything_is_written(
    parts, recorded_experts, tmp_path, case, match
):
    experts = list(recorded_experts)
    if case == "swapped":
        experts.reverse()
    elif case == "same_folder_twice":
        experts[1] = experts[0]
    elif case == "same_expert_copied":
        experts[1] = copy_expert(experts[0], tmp_path / "e0_copy")
    elif case == "other_clusters":
        for k, expert in enumerate(experts):
            record_job(expert, k, parts["other"])
    elif case == "unfinished":
        record_job(experts[1], 1, parts["clusters"], complete=False)
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        build_mode(experts, parts["clusters"], output)
    assert_nothing_written(output)


def test_experts_without_a_job_record_are_accepted_with_a_warning(parts, recorded_experts, tmp_path, caplog):
    (recorded_experts[1] / JOB_FILE).unlink()
    with caplog.at_level("WARNING"):
        build_mode(recorded_experts, parts["clusters"], tmp_path / "out", return_model=False)
    assert f"1 expert(s) hold no `hf-moe mode train-expert` job record (hf_moe_job.json): {recorded_experts[1]}" in (
        caplog.text
    )
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_build_checks_the_records_against_the_clusters_it_read_once(parts, recorded_experts, tmp_path, monkeypatch):
    """Issue 16: the clusters folder is read once; the experts' recorded `clusters_id` is compared with the
    fingerprint of the very bytes the model is built from, not with a second reading of the folder."""
    import sys

    from hf_moe.mode.cluster_files import load_cluster_folder

    assert load_cluster_folder(parts["clusters"]).id == clusters_id(parts["clusters"])

    def read_again(clusters):
        raise AssertionError(f"{clusters} was read a second time")

    monkeypatch.setattr(sys.modules["hf_moe.conversion.build_mode"], "clusters_id", read_again)
    build_mode(recorded_experts, parts["clusters"], tmp_path / "out", return_model=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_trained_expert_next_to_its_seed_differs_in_dtype_only_and_builds(parts, tmp_path):
    # The seed is saved without a dtype on its towers; an expert loaded and saved by transformers records float32
    # on them: no architecture difference.
    trained = tmp_path / "trained"
    CLIPModel.from_pretrained(parts["experts"][0]).save_pretrained(trained)
    build_mode([parts["experts"][1], trained], parts["clusters"], tmp_path / "out", return_model=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def hf_moe_folder(source, folder, model_type):
    """`source`'s config relabelled as an hf-moe model (all a kind check reads)."""
    folder.mkdir()
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    return folder


@pytest.mark.parametrize(
    "kind, match",
    [
        ("we_moe", r"'.*wrong' is already a WEMoE \('we_moe'\); this step needs a DENSE CLIP"),
        ("clip_moe", r"'.*wrong' is already a CLIP-MoE \('clip_moe'\); this step needs a DENSE CLIP"),
        ("bert", r"'.*bert' is a 'bert' model; an EXPERT of `hf-moe mode build` \(a dense CLIPModel\) takes"),
    ],
)
def test_an_expert_that_is_not_a_dense_clip_is_refused(parts, upcycled_dir, tmp_path, kind, match):
    if kind == "we_moe":
        wrong = hf_moe_folder(parts["experts"][1], tmp_path / "wrong", "we_moe")
    elif kind == "clip_moe":
        wrong = shutil.copytree(upcycled_dir, tmp_path / "wrong")
    else:
        wrong = parts["bert"]
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        build_mode([parts["experts"][0], wrong], parts["clusters"], output)
    assert_nothing_written(output)


def test_train_expert_refuses_a_wemoe_seed(inputs, tmp_path):  # noqa: F811
    seed = hf_moe_folder(inputs["seed"], tmp_path / "wemoe", "we_moe")
    with pytest.raises(ValueError, match=r"'.*wemoe' is already a WEMoE \('we_moe'\); this step needs a DENSE CLIP"):
        train_expert_main(expert_argv(inputs, tmp_path / "out", "--seed_model", str(seed)))
    assert_nothing_written(tmp_path / "out")


def test_train_expert_refuses_another_data_sets_clusters(inputs, tmp_path):  # noqa: F811
    clusters = tmp_path / "clusters"
    shutil.copytree(inputs["clusters"], clusters)
    part = clusters / "assignments" / "part-00000.parquet"
    table = pq.read_table(part).to_pydict()
    table["key"] = [f"other/{key}" for key in table["key"]]
    pq.write_table(pa.table(table), part)
    with pytest.raises(ClustersMismatchError) as error:
        train_expert_main(expert_argv(inputs, tmp_path / "out", "--clusters", str(clusters)))
    assert isinstance(error.value, ValueError)
    message = str(error.value)
    assert f"32 of 32 rows of {inputs['data']} are not in the assignments of {clusters}" in message
    assert "pair key '" in message and "the clusters were made from other data" in message
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("command", ["embed", "cluster"])
@pytest.mark.parametrize(
    "encoder, pooling, match",
    [
        ("clip", "pooler", r"'.*clip' is a CLIP \('clip'\): its captions are embedded with --pooling 'clip'"),
        ("bert", "clip", r"'.*bert' is a 'bert' model; the clustering encoder of --pooling 'clip' .* takes .*'clip'"),
    ],
)
def test_encoder_and_pooling_that_do_not_fit_are_refused_before_anything_is_written(
    parts,
    inputs,  # noqa: F811
    tmp_path,
    command,
    encoder,
    pooling,
    match,
):
    encoder_dir = inputs["seed"] if encoder == "clip" else parts["bert"]
    output = tmp_path / "out"
    argv = ["--data", str(inputs["data"]), "--output_dir", str(output), "--encoder", str(encoder_dir)]
    argv += ["--pooling", pooling]
    main = embed_main if command == "embed" else cluster_main
    if command == "cluster":
        argv += ["--num_experts", "2", "--num_fine_clusters", "4"]
    with pytest.raises(ValueError, match=match):
        main(argv)
    assert_nothing_written(output)


def write_embeddings(folder, data, shards):
    """An `hf-moe mode embed` output of `data` holding `shards` (a list of (keys, tensor))."""
    folder.mkdir()
    for index, (keys, tensor) in enumerate(shards):
        save_file({"embeddings": tensor}, shard_path(folder, index), metadata={"keys": json.dumps(keys)})
    summary = {
        "encoder": {"name_or_path": "bert", "pooling": "pooler", "max_length": 32},
        "dim": shards[0][1].shape[1],
        "count": sum(len(keys) for keys, _ in shards),
        "num_shards": len(shards),
        "shard_size": len(shards[0][0]),
        "dtype": "float32",
    }
    (folder / "embed.json").write_text(json.dumps(summary))
    record = {"command": "mode-embed", "options": {}, "inputs": {"data": input_fingerprint(data)}, "complete": True}
    (folder / JOB_FILE).write_text(json.dumps(record))
    return folder


def test_an_empty_embeddings_folder_is_named_not_a_fingerprint(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "000.txt").write_text("a caption")
    (tmp_path / "embeddings").mkdir()
    output = tmp_path / "clusters"
    argv = ["--data", str(data), "--output_dir", str(output), "--num_experts", "2", "--num_fine_clusters", "4"]
    with pytest.raises(FileNotFoundError, match=r"--embeddings .*embeddings holds no embed\.json and no embedding"):
        cluster_main([*argv, "--embeddings", str(tmp_path / "embeddings")])
    with pytest.raises(FileNotFoundError, match=r"--embeddings .*missing does not exist"):
        cluster_main([*argv, "--embeddings", str(tmp_path / "missing")])
    assert_nothing_written(output)


def test_a_non_finite_embedding_is_named_by_shard_row_and_key_before_anything_is_written(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "000.txt").write_text("a caption")
    generator = torch.Generator().manual_seed(0)
    shards = [([f"s{i}/{r}" for r in range(4)], torch.randn(4, 8, generator=generator)) for i in range(3)]
    # A row outside the fine k-means sample (seed 0, 4 of 12 pairs), which was assigned to a cluster silently.
    sample = set(torch.randperm(12, generator=torch.Generator().manual_seed(0))[:4].tolist())
    row = next(r for r in range(4, 12) if r not in sample)
    shards[row // 4][1][row % 4, 3] = float("nan")
    embeddings = write_embeddings(tmp_path / "embeddings", data, shards)
    output = tmp_path / "clusters"
    argv = ["--data", str(data), "--output_dir", str(output), "--num_experts", "2", "--num_fine_clusters", "4"]
    argv += ["--fine_sample_size", "4", "--embeddings", str(embeddings)]
    bad_shard = shard_path(embeddings, row // 4)
    key = f"s{row // 4}/{row % 4}"
    with pytest.raises(ValueError, match=rf"Embedding shard {bad_shard}: row {row % 4} \(pair key '{key}'\) holds NaN"):
        cluster_main(argv)
    assert_nothing_written(output)


def test_embed_refuses_a_non_finite_embedding_naming_the_caption(parts, inputs, tmp_path, monkeypatch):  # noqa: F811
    from hf_moe.mode import embed as embed_module

    embed_texts = embed_module.embed_texts

    def overflowing(*args, **kwargs):
        embeddings = embed_texts(*args, **kwargs).clone()
        embeddings[2, 0] = float("inf")
        return embeddings

    monkeypatch.setattr(embed_module, "embed_texts", overflowing)
    output = tmp_path / "embeddings"
    argv = ["--data", str(inputs["data"]), "--output_dir", str(output), "--encoder", str(parts["bert"])]
    with pytest.raises(
        ValueError,
        match=r"NaN or infinite embeddings for 1 caption\(s\) of shard "
        r"embeddings-00000\.safetensors, the first at row 2 \(pair key '00002\.png', caption",
    ):
        embed_main(argv)
    assert not shard_path(output, 0).exists()
