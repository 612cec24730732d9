"""The streamed converters `hf-moe merge`, `merge-wemoe` and `mode build` write, tensor for tensor and byte for byte,
what the in-memory implementations they replaced wrote (kept here as references: whole models loaded, merged,
saved); TIES' streamed threshold is torch.kthvalue's exactly; `--dtype` and sharding; transformers 4 checkpoints of
a CLIPVisionModel (`vision_model.` names) are read as from_pretrained reads them."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_merging import save_clip_finetune, save_vision_finetune
from test_mode_build import write_clusters
from transformers import AutoModel, CLIPModel, CLIPTextModelWithProjection

from hf_moe import merging
from hf_moe.conversion import build_mode, merge_wemoe
from hf_moe.conversion.merge_wemoe import MLP_KEY, we_moe_vision_config
from hf_moe.loading import load_config
from hf_moe.merging import (
    MagnitudeSelection,
    StateDictSource,
    get_merge_method,
    load_for_merge,
    merge_clip_vision,
    streamed_merge,
    task_vectors,
)
from hf_moe.modeling import MoDEConfig, MoDEModel, WEMoECLIPModel, WEMoECLIPVisionModel

from helpers import save_tiny_bert


# ------------------------------------------------------------------------------------------ exact selection


def kth_by_selection(pieces, k):
    selection = MagnitudeSelection(k)
    while not selection.done:
        for piece in pieces:
            selection.add(piece)
        selection.end_pass()
    return selection.value


@pytest.mark.parametrize("seed", range(4))
def test_two_pass_radix_selection_is_kthvalue_with_ties_zeros_and_subnormals(seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(3000, generator=generator)
    values[::7] = 0.0
    values[1::11] = -0.0
    values[2::5] = values[3]  # many ties at one magnitude, both signs
    values[4::13] = -values[3]
    values[5::17] = torch.tensor(1e-40)  # subnormal
    values[6::19] = values[6::19].bfloat16().float()  # close magnitudes sharing their high bits
    values = values[torch.randperm(values.numel(), generator=generator)]
    pieces = list(values.split([1, 999, 0, 1500, 500]))
    magnitudes = values.abs()
    for k in (1, 2, 400, 429, 430, 1500, 2999, 3000):
        expected = torch.kthvalue(magnitudes, k).values
        got = kth_by_selection(pieces, k)
        assert got.dtype == torch.float32 and torch.equal(got.view(torch.int32), expected.view(torch.int32)), k
    with pytest.raises(ValueError, match="3001-th smallest of 3000"):
        kth_by_selection(pieces, 3001)


def test_radix_selection_finds_values_differing_only_in_the_low_bits():
    base = torch.tensor(1.5).view(torch.int32)
    values = (base + torch.tensor([5, 3, 3, 9, 0, 65535 - base.item() % 65536])).view(torch.float32)
    for k in range(1, values.numel() + 1):
        assert torch.equal(kth_by_selection([values[:2], values[2:]], k), torch.kthvalue(values, k).values)


# ------------------------------------------------------------------------------------------ streamed methods


def random_states(num_tasks=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = {
        "w": torch.randn(6, 5, generator=generator),
        "b": torch.randn(5, generator=generator),
        "n": torch.tensor([3]),
        "v": torch.randn(40, generator=generator),
    }
    finetuned = []
    for i in range(num_tasks):
        state = {
            k: t + torch.randn(t.shape, generator=generator) if t.is_floating_point() else t for k, t in base.items()
        }
        state["w"][0] = base["w"][0]  # zero task vectors: ties at zero magnitude, zero-mass entries
        state["b"][:2] = base["b"][:2] + (1.0 if i % 2 else -1.0)  # sums that cancel: the majority sign decides
        finetuned.append(state)
    return base, finetuned


@pytest.mark.parametrize(
    "method, options",
    [
        ("average", {}),
        ("task_arithmetic", {"scaling": 0.4}),
        ("ties", {}),
        ("ties", {"density": 0.35, "aggregation": "mean"}),
        ("ties", {"density": 0.5, "trim": "tensor"}),
        ("ties", {"density": 1.0}),
        ("ties", {"density": 0.01}),
    ],
)
@pytest.mark.parametrize("num_tasks", [1, 2, 4])
@pytest.mark.parametrize("block", [7, 1 << 20])
def test_streamed_merge_is_the_in_memory_method_bit_for_bit(method, options, num_tasks, block, monkeypatch):
    monkeypatch.setattr(merging, "TIES_BLOCK_ELEMENTS", block)  # TIES in blocks of entries, or whole tensors
    base, finetuned = random_states(num_tasks)
    expected = get_merge_method(method).fn(base, task_vectors(base, finetuned), **options)
    merged = streamed_merge(method, StateDictSource(base, finetuned), **options)
    for key in ("w", "b", "v"):
        assert torch.equal(merged(key), expected[key]), key


def test_adamerging_coefficients_merge_per_tensor_as_in_memory(caplog):
    from hf_moe.we_moe.adamerging import adamerging_merge  # registers "adamerging"

    base, finetuned = random_states(3)
    coefficients = {"w": [0.2, 0.7, 1.5], "b": [-0.1, 0.4, 0.9]}  # "v" falls back to 0.3; clamping applies
    expected = adamerging_merge(base, task_vectors(base, finetuned), coefficients=coefficients)
    merged = streamed_merge("adamerging", StateDictSource(base, finetuned), coefficients=coefficients)
    for key in ("w", "b", "v"):
        assert torch.equal(merged(key), expected[key]), key
    assert "held in memory" not in caplog.text


def test_a_method_without_streamed_form_still_merges_with_a_warning():
    def first_only(pretrained, task_vectors):
        return merging.add_to_pretrained(pretrained, dict(task_vectors[0]))

    merging.register_merge_method("first_only_test", first_only)
    try:
        base, finetuned = random_states(2)
        merged = streamed_merge("first_only_test", StateDictSource(base, finetuned))
        assert torch.equal(merged("w"), finetuned[0]["w"])
    finally:
        merging.MERGE_METHODS.pop("first_only_test")


# ------------------------------------------------------------------------------------------ references


def reference_merge(method, pretrained, finetuned, **options):
    """What merge_clip_vision saved before streaming: the loaded pretrained model with its merged vision tower."""
    model, base_state, finetuned_states = load_for_merge(pretrained, finetuned)
    merged = get_merge_method(method).fn(base_state, task_vectors(base_state, finetuned_states), **options)
    merging.vision_tower_module(model).load_state_dict(merged, strict=True)
    return model.state_dict()


def reference_wemoe(pretrained, finetuned, init_lambda=0.3, seed=0, **fields):
    """What merge_wemoe saved before streaming (its in-memory body, unchanged)."""
    task_vector_format = (
        "pruned" if fields.get("prune_ratio") else "svd" if fields.get("svd_rank_fraction") else "dense"
    )
    kind, base_config = merging.clip_vision_kind(pretrained)
    vision_source = base_config.vision_config if kind == "CLIPModel" else base_config
    vision_config = we_moe_vision_config(
        vision_source,
        num_tasks=len(finetuned),
        task_names=[f"t{i}" for i in range(len(finetuned))],
        init_lambda=init_lambda,
        task_vector_format=task_vector_format,
        **{"prune_ratio": 0.9, **{k: v for k, v in fields.items() if v is not None}},
    )
    base_model, base_state, finetuned_states = load_for_merge(pretrained, finetuned)
    taus = task_vectors(base_state, finetuned_states)
    merged = get_merge_method("task_arithmetic").fn(base_state, taus, scaling=init_lambda)
    moe_layers = set(vision_config.moe_layer_indices())
    is_moe_mlp = {key: bool((m := MLP_KEY.match(key)) and int(m["layer"]) in moe_layers) for key in base_state}
    tower_state = {key: base_state[key] if is_moe_mlp[key] else merged[key] for key in base_state}
    dtype = next(base_model.parameters()).dtype
    torch.manual_seed(seed)
    if kind == "CLIPModel":
        from hf_moe.modeling import WEMoEConfig

        config = WEMoEConfig(
            text_config=base_config.text_config.to_dict(),
            vision_config=vision_config.to_dict(),
            projection_dim=base_config.projection_dim,
            logit_scale_init_value=base_config.logit_scale_init_value,
            initializer_factor=base_config.initializer_factor,
        )
        model = WEMoECLIPModel(config)
        tower = model.vision_model
        with torch.no_grad():
            model.text_model.load_state_dict(base_model.text_model.state_dict())
            model.text_projection.load_state_dict(base_model.text_projection.state_dict())
            model.visual_projection.load_state_dict(base_model.visual_projection.state_dict())
            model.logit_scale.copy_(base_model.logit_scale)
    else:
        model = WEMoECLIPVisionModel(vision_config)
        tower = model
    tower.load_state_dict(tower_state, strict=False)
    mlp_keys = [key for key in base_state if is_moe_mlp[key]]
    tower.load_task_vectors({k: base_state[k] for k in mlp_keys}, [{k: tau[k] for k in mlp_keys} for tau in taus])
    return model.to(dtype).state_dict()


def reference_mode(experts, clusters, encoder, pooling):
    """What build_mode saved before streaming: a float32 MoDEModel filled from the loaded experts and encoder."""
    from hf_moe.conversion.build_mode import clustering_encoder_config
    from hf_moe.mode.cluster_files import read_cluster_folder

    info, centers = read_cluster_folder(clusters)
    encoder_config, _ = clustering_encoder_config(encoder, pooling)
    config = MoDEConfig(
        expert_config=load_config(experts[0], require_moe=False).to_dict(),
        num_experts=len(experts),
        num_fine_clusters=info["num_fine_clusters"],
        clustering_encoder_config=encoder_config.to_dict(),
        clustering_pooling=pooling,
    )
    model = MoDEModel(config).eval()
    with torch.no_grad():
        for k, expert in enumerate(experts):
            model.experts[k].load_state_dict(CLIPModel.from_pretrained(expert, dtype=torch.float32).state_dict())
        encoder_class = CLIPTextModelWithProjection if pooling == "clip" else AutoModel
        model.clustering_encoder.load_state_dict(
            encoder_class.from_pretrained(encoder, dtype=torch.float32).state_dict()
        )
        model.fine_centers.copy_(centers["fine_centers"])
        model.fine_to_coarse.copy_(centers["fine_to_coarse"])
        model.logit_scale.copy_(torch.stack([clip.logit_scale.exp() for clip in model.experts]).mean().log())
    return model.state_dict()


def written(folder):
    """Every tensor of a saved folder (one file or shards), in file order."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as file:
            tensors.update({key: file.get_tensor(key) for key in file.keys()})
    return tensors


def assert_bitwise_equal(folder, expected, dtype=None):
    tensors = written(folder)
    assert sorted(tensors) == sorted(expected)
    for key, tensor in tensors.items():
        reference = expected[key] if dtype is None or not expected[key].is_floating_point() else expected[key].to(dtype)
        assert tensor.dtype == reference.dtype and tensor.shape == reference.shape, key
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), reference.reshape(-1).view(torch.uint8)), key


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def inputs(toy_clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    finetuned = [save_vision_finetune(toy_clip_dir, root / f"task{i}", seed=30 + i) for i in range(2)]
    finetuned.append(save_clip_finetune(toy_clip_dir, root / "task2", seed=40))
    # bfloat16 copies of the pretrained CLIP and of the fine-tunes
    bf16 = []
    for source in [toy_clip_dir, *finetuned]:
        target = root / f"{source.name}-bf16"
        model = AutoModel.from_pretrained(source).to(torch.bfloat16)
        model.save_pretrained(target)
        for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
            (target / name).write_bytes((source / name).read_bytes())
        bf16.append(target)
    return root, finetuned, bf16


@pytest.mark.parametrize(
    "method, options",
    [
        ("average", {}),
        ("task_arithmetic", {"scaling": 0.4}),
        ("ties", {}),
        ("ties", {"density": 0.3, "aggregation": "mean"}),
    ],
)
def test_merge_writes_what_the_in_memory_merge_wrote(toy_clip_dir, inputs, tmp_path, method, options):
    root, finetuned, _ = inputs
    merge_clip_vision(method, toy_clip_dir, finetuned, tmp_path / "out", return_model=False, **options)
    assert_bitwise_equal(tmp_path / "out", reference_merge(method, toy_clip_dir, finetuned, **options))


def test_merge_of_bf16_checkpoints_stays_bf16_and_bitwise_equal(inputs, tmp_path):
    root, _, bf16 = inputs
    merge_clip_vision("ties", bf16[0], bf16[1:], tmp_path / "out", return_model=False)
    expected = reference_merge("ties", bf16[0], bf16[1:])
    assert {t.dtype for t in expected.values()} == {torch.bfloat16}
    assert_bitwise_equal(tmp_path / "out", expected)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_merge_dtype_and_shards(toy_clip_dir, inputs, tmp_path):
    root, finetuned, _ = inputs
    output = tmp_path / "out"
    model = merge_clip_vision("average", toy_clip_dir, finetuned, output, dtype="bfloat16", max_shard_size="100KB")
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (output / "model.safetensors").exists()
    assert next(model.parameters()).dtype == torch.bfloat16
    assert_bitwise_equal(output, reference_merge("average", toy_clip_dir, finetuned), dtype=torch.bfloat16)
    assert "--dtype bfloat16" in (output / "README.md").read_text()
    with pytest.raises(ValueError, match="dtype must be one of"):
        merge_clip_vision("average", toy_clip_dir, finetuned, tmp_path / "bad", dtype="float64")
    assert not (tmp_path / "bad").exists()


def test_transformers4_vision_checkpoint_names_are_mapped(toy_clip_dir, inputs, tmp_path):
    """A CLIPVisionModel saved by transformers 4 (the tanganke fine-tunes) names its tensors `vision_model.*`."""
    root, finetuned, _ = inputs
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for path in finetuned[0].iterdir():
        (legacy / path.name).write_bytes(path.read_bytes())
    state = load_file(finetuned[0] / "model.safetensors")
    save_file({f"vision_model.{key}": tensor for key, tensor in state.items()}, legacy / "model.safetensors")
    merge_clip_vision("ties", toy_clip_dir, [legacy, finetuned[1]], tmp_path / "out", return_model=False)
    assert_bitwise_equal(tmp_path / "out", reference_merge("ties", toy_clip_dir, [finetuned[0], finetuned[1]]))


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"router_depth": 0, "moe_layers": 1},
        {"prune_ratio": 0.9, "shared_router": True, "router_depth": 1},
        {"svd_rank_fraction": 0.5},
    ],
)
def test_merge_wemoe_writes_what_the_in_memory_build_wrote(toy_clip_dir, inputs, tmp_path, fields):
    root, finetuned, _ = inputs
    names = [f"t{i}" for i in range(3)]
    merge_wemoe(toy_clip_dir, finetuned, tmp_path / "out", task_names=names, seed=5, return_model=False, **fields)
    assert_bitwise_equal(tmp_path / "out", reference_wemoe(toy_clip_dir, finetuned, seed=5, **fields))


def test_merge_wemoe_bf16_vision_only_and_dtype(inputs, tmp_path):
    root, finetuned, bf16 = inputs
    names = ["t0", "t1"]
    merge_wemoe(bf16[1], bf16[2:], tmp_path / "vision", task_names=names, prune_ratio=0.8, return_model=False)
    expected = reference_wemoe(bf16[1], bf16[2:], prune_ratio=0.8)
    assert expected["encoder.layers.0.mlp.task_vectors.fc1_weight_values"].dtype == torch.bfloat16
    assert_bitwise_equal(tmp_path / "vision", expected)
    model = merge_wemoe(bf16[0], bf16[1:], tmp_path / "fp32", task_names=["t0", "t1", "t2"], dtype="float32")
    assert next(model.parameters()).dtype == torch.float32
    assert "--dtype float32" in (tmp_path / "fp32" / "README.md").read_text()


@pytest.mark.parametrize("pooling", ["pooler", "clip"])
def test_mode_build_writes_what_the_in_memory_build_wrote(inputs, tmp_path, pooling):
    from hf_moe.toy import save_toy_clip

    experts = [save_toy_clip(tmp_path / f"expert{k}", seed=50 + k) for k in range(2)]
    if pooling == "clip":
        encoder, dim = experts[1], CLIPModel.from_pretrained(experts[1]).config.projection_dim
    else:
        encoder, dim = save_tiny_bert(tmp_path / "bert"), 16
    clusters = write_clusters(tmp_path / "clusters", dim=dim, encoder=encoder, pooling=pooling)
    build_mode(experts, clusters, tmp_path / "mode", return_model=False)
    expected = reference_mode(experts, clusters, encoder, pooling)
    assert_bitwise_equal(tmp_path / "mode", expected)
    build_mode(experts, clusters, tmp_path / "mode16", dtype="bfloat16", max_shard_size="200KB", return_model=False)
    assert (tmp_path / "mode16" / "model.safetensors.index.json").is_file()
    assert_bitwise_equal(tmp_path / "mode16", expected, dtype=torch.bfloat16)


@pytest.mark.parametrize("storage", ["pruned", "svd"])
def test_task_vector_storage_task_by_task_is_the_batched_storage_with_tied_magnitudes(storage):
    """merge-wemoe stores pruned / SVD task vectors one task at a time: per-row quantiles, top-k (ties included)
    and per-matrix SVDs give the bytes the batched fill gives."""
    from types import SimpleNamespace

    from hf_moe.modeling.modeling_we_moe import TASK_VECTOR_STORAGE

    generator = torch.Generator().manual_seed(0)
    for name, shape in (("fc1.weight", (96, 40)), ("fc2.bias", (40,))):
        stacked = (torch.randn(5, *shape, generator=generator) * 4).round() / 4  # many tied magnitudes
        stacked[:, :3] = 0.0

        def store(tensors, num_tasks, name=name, shape=shape):
            config = SimpleNamespace(num_tasks=num_tasks, prune_ratio=0.9, svd_rank_fraction=0.3)
            module = TASK_VECTOR_STORAGE[storage](config, {name: shape})
            module.fill(name, tensors)
            return module.state_dict()

        batched = store(stacked, 5)
        per_task = [store(stacked[i : i + 1].clone(), 1) for i in range(5)]
        for key, tensor in batched.items():
            assert torch.equal(torch.cat([part[key] for part in per_task]), tensor), key
