"""WEMoE / E-WEMoE model: the per-sample merge against straightforward references, storage formats, routers,
routing-weight outputs and config validation. Tiny shapes, fp32."""

import math
import types

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModel, CLIPVisionConfig, CLIPVisionModel

from hf_moe.modeling import (
    WEMoECLIPModel,
    WEMoECLIPVisionModel,
    WEMoECLIPVisionModelWithProjection,
    WEMoEConfig,
    WEMoEMLP,
    WEMoERouter,
    WEMoEVisionConfig,
)
from hf_moe.modeling.modeling_we_moe import PrunedTaskVectors


MLP_NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
# The MLP is large next to the rest (intermediate 8 x hidden), so that storage tests measure the task vectors.
TINY = dict(
    hidden_size=16, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2, image_size=16, patch_size=8
)


def vision_config(**kwargs) -> WEMoEVisionConfig:
    return WEMoEVisionConfig(**{**TINY, "num_tasks": 3, **kwargs})


def dense_tower(seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**TINY)).eval()


def mlp_dicts(dense: CLIPVisionModel, num_tasks: int, seed: int = 1):
    """The dense tower's MLP tensors and `num_tasks` random task vectors, keyed like `load_task_vectors` wants."""
    generator = torch.Generator().manual_seed(seed)
    pretrained = {k: v.clone() for k, v in dense.state_dict().items() if ".mlp." in k}
    task_vectors = [
        {k: 0.05 * torch.randn(v.shape, generator=generator) for k, v in pretrained.items()} for _ in range(num_tasks)
    ]
    return pretrained, task_vectors


def build(config: WEMoEVisionConfig, dense=None, task_vectors=None, seed: int = 0) -> WEMoECLIPVisionModel:
    """A WEMoE tower with the dense tower's non-MLP weights and random routers large enough to route differently
    per sample (the init std of 0.01 gives nearly constant weights)."""
    dense = dense if dense is not None else dense_tower(seed)
    pretrained, random_tvs = mlp_dicts(dense, config.num_tasks, seed + 1)
    torch.manual_seed(seed + 2)
    model = WEMoECLIPVisionModel(config).eval()
    model.load_state_dict(dense.state_dict(), strict=False)
    model.load_task_vectors(pretrained, task_vectors if task_vectors is not None else random_tvs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "router" in name and param.dim() == 2:
                param.normal_(0, 0.5)
    return model


def pixels(batch_size: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def reference_forward(self, hidden_states, reduce=False):
    """A straightforward per-sample loop: route the sample alone, merge its MLP, run it (the reference's way)."""
    weights = [self.router(hidden_states[b : b + 1])[0] for b in range(hidden_states.shape[0])]
    if reduce:
        weights = [torch.stack(weights).mean(0)] * len(weights)
    outputs = []
    for sample, r in zip(hidden_states, weights):
        merged = {
            name: self.get_parameter(name) + torch.tensordot(r, self.task_vectors.stacked(name), dims=1)
            for name in MLP_NAMES
        }
        hidden = self.activation_fn(F.linear(sample, merged["fc1.weight"], merged["fc1.bias"]))
        outputs.append(F.linear(hidden, merged["fc2.weight"], merged["fc2.bias"]))
    return torch.stack(outputs)


def use_reference(model, reduce=False):
    for module in model.modules():
        if isinstance(module, WEMoEMLP):
            module.forward = types.MethodType(lambda self, h: reference_forward(self, h, reduce), module)
    return model


def router_grads(model, pixel_values):
    model.zero_grad()
    out = model(pixel_values).last_hidden_state
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "router" in n}


def test_depth0_router_with_constant_weights_is_the_task_arithmetic_model():
    dense = dense_tower()
    pretrained, task_vectors = mlp_dicts(dense, 3)
    lambdas = torch.tensor([0.3, -0.2, 0.5])
    model = WEMoECLIPVisionModel(vision_config(router_depth=0)).eval()
    model.load_state_dict(dense.state_dict(), strict=False)
    model.load_task_vectors(pretrained, task_vectors)
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.mlp.router.weight.copy_(lambdas)
    merged = dense_tower()
    merged.load_state_dict(
        {k: v + sum(lam * tv[k] for lam, tv in zip(lambdas, task_vectors)) for k, v in pretrained.items()},
        strict=False,
    )
    with torch.no_grad():
        ours, expected = model(pixels()), merged(pixels())
    torch.testing.assert_close(ours.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)
    # Not the pretrained model: the task vectors matter.
    assert not torch.allclose(ours.pooler_output, dense(pixels()).pooler_output, atol=1e-3)


@pytest.mark.parametrize("router_depth,shared_router", [(1, False), (2, False), (2, True)])
def test_batched_per_sample_merge_equals_a_per_sample_loop_values_and_router_gradients(router_depth, shared_router):
    model = build(vision_config(router_depth=router_depth, shared_router=shared_router))
    reference = use_reference(build(vision_config(router_depth=router_depth, shared_router=shared_router)))
    x = pixels(5)
    out = model(x, output_routing_weights=True)
    weights = torch.stack(out.routing_weights)  # (layers, batch, tasks)
    assert (weights.std(dim=1) > 1e-2).all(), "routers should route the samples differently"
    torch.testing.assert_close(out.last_hidden_state, reference(x).last_hidden_state, atol=1e-5, rtol=1e-5)
    ours, expected = router_grads(model, x), router_grads(reference, x)
    assert ours.keys() == expected.keys() and ours
    for name in ours:
        assert ours[name].abs().sum() > 0
        torch.testing.assert_close(ours[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_gradients_wrt_inputs_and_task_vectors_match_the_loop():
    model = build(vision_config(router_depth=2))
    reference = use_reference(build(vision_config(router_depth=2)))
    grads = []
    for m in (model, reference):
        x = pixels(3).requires_grad_(True)
        m.zero_grad()
        (m(x).pooler_output ** 2).sum().backward()
        tv = m.encoder.layers[0].mlp.task_vectors
        grads.append((x.grad, tv.fc1_weight.grad, tv.fc2_bias.grad, m.encoder.layers[1].mlp.fc2.weight.grad))
    for ours, expected in zip(*grads):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_router_gradients():
    model = build(vision_config(router_depth=2, task_vector_format="svd", svd_rank_fraction=0.5)).train()
    expected = router_grads(model, pixels(3))
    model.activation_checkpointing_enable()
    assert model.encoder.layers[0].gradient_checkpointing
    for name, grad in router_grads(model, pixels(3)).items():
        torch.testing.assert_close(grad, expected[name], atol=0, rtol=0, msg=name)


def test_a_sample_does_not_depend_on_the_rest_of_its_batch_unless_batch_reduce():
    x, others = pixels(4, seed=0), pixels(4, seed=1)
    mixed = torch.cat([x[:1], others[1:]])
    model = build(vision_config(router_depth=2))
    with torch.no_grad():
        torch.testing.assert_close(model(x).pooler_output[0], model(mixed).pooler_output[0], atol=1e-6, rtol=1e-6)
        # The same sample alone: batched and unbatched agree.
        torch.testing.assert_close(model(x).pooler_output[:1], model(x[:1]).pooler_output, atol=1e-6, rtol=1e-6)
    reduced = build(vision_config(router_depth=2, batch_reduce=True))
    with torch.no_grad():
        assert not torch.allclose(reduced(x).pooler_output[0], reduced(mixed).pooler_output[0], atol=1e-4)


def test_batch_reduce_is_one_merge_with_the_batch_mean_weights():
    model = build(vision_config(router_depth=2, batch_reduce=True))
    reference = use_reference(build(vision_config(router_depth=2, batch_reduce=True)), reduce=True)
    x = pixels(4)
    out = model(x, output_routing_weights=True)
    for layer_weights in out.routing_weights:  # every sample reports the batch's weights
        torch.testing.assert_close(layer_weights, layer_weights[:1].expand_as(layer_weights))
    torch.testing.assert_close(out.last_hidden_state, reference(x).last_hidden_state, atol=1e-5, rtol=1e-5)
    ours, expected = router_grads(model, x), router_grads(reference, x)
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)


def reconstructed_task_vectors(model, num_tasks):
    tvs = [{} for _ in range(num_tasks)]
    for i, layer in enumerate(model.encoder.layers):
        for name in MLP_NAMES:
            stacked = layer.mlp.task_vectors.stacked(name).detach()
            for task in range(num_tasks):
                tvs[task][f"encoder.layers.{i}.mlp.{name}"] = stacked[task].clone()
    return tvs


def test_pruned_task_vectors_keep_the_largest_entries_and_equal_the_dense_model_built_from_them():
    dense = dense_tower()
    _, task_vectors = mlp_dicts(dense, 3)
    pruned = build(vision_config(task_vector_format="pruned", prune_ratio=0.9), dense)
    reconstructed = reconstructed_task_vectors(pruned, 3)
    for original, kept in zip(task_vectors, reconstructed):
        for key, tensor in original.items():
            # fusion_bench's sparse_we_moe._magnitude_prune, written out.
            expected = tensor * (tensor.abs() > tensor.abs().quantile(0.9))
            assert torch.equal(kept[key], expected), key
            assert int((kept[key] != 0).sum()) == math.ceil(0.1 * (tensor.numel() - 1)), key  # distinct magnitudes
    reference = build(vision_config(), dense, task_vectors=reconstructed)
    reference.load_state_dict({k: v for k, v in pruned.state_dict().items() if "router" in k}, strict=False)
    x = pixels(4)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).last_hidden_state, reference(x).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_pruning_keeps_the_entries_strictly_above_the_quantile_counted_by_hand():
    # 12 entries, prune_ratio 0.9: torch.quantile's rank is 0.9 * 11 = 9.9, between the 10th and 11th smallest.
    # Task 0 (|x| = 0.1 ... 1.2): quantile 1.0 + 0.9 * (1.1 - 1.0) = 1.09, so 1.1 and -1.2 are kept: 2 entries, where
    # round(0.1 * 12) would keep 1. Task 1 (eleven |x| = 1, one -3): the quantile is 1, only -3 is above it; the
    # second stored slot is an explicit zero.
    config = types.SimpleNamespace(num_tasks=2, prune_ratio=0.9)
    storage = PrunedTaskVectors(config, {"fc1.bias": (12,)})
    task0 = torch.tensor([0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -1.0, 1.1, -1.2])
    task1 = torch.tensor([1.0, -1.0] * 5 + [1.0, -3.0])
    storage.fill("fc1.bias", torch.stack([task0, task1]))
    assert storage.fc1_bias_values.shape == (2, 2)  # 12 - 1 - floor(9.9) slots per task
    expected = torch.zeros(2, 12)
    expected[0, 10], expected[0, 11], expected[1, 11] = 1.1, -1.2, -3.0
    assert torch.equal(storage.stacked("fc1.bias"), expected)


def test_prune_mask_equals_fusion_bench_quantile_rule_with_ties_and_any_ratio():
    generator = torch.Generator().manual_seed(0)
    for size in (1, 2, 11, 12, 307, 3072):
        for ratio in (0.0, 0.5, 0.9, 0.99):
            rows = torch.randn(3, size, generator=generator, dtype=torch.float64 if size == 307 else torch.float32)
            rows[1, : size // 2] = rows[1, 0]  # magnitudes tied across half the row
            expected = torch.stack([row.abs() > row.abs().quantile(ratio) for row in rows])
            mask = PrunedTaskVectors.prune_mask(rows, ratio)
            assert torch.equal(mask, expected), (size, ratio)
            config = types.SimpleNamespace(prune_ratio=ratio)
            assert int(mask.sum(dim=1).max()) <= PrunedTaskVectors.kept_count(config, (size,))


def test_svd_task_vectors_are_the_truncated_svd_and_equal_the_dense_model_built_from_them():
    dense = dense_tower()
    _, task_vectors = mlp_dicts(dense, 3)
    svd = build(vision_config(task_vector_format="svd", svd_rank_fraction=0.25), dense)
    mlp = svd.encoder.layers[0].mlp
    assert mlp.task_vectors.fc1_weight_u.shape == (3, 128, 4) and mlp.task_vectors.fc1_weight_v.shape == (3, 4, 16)
    reconstructed = reconstructed_task_vectors(svd, 3)
    key = "encoder.layers.0.mlp.fc2.weight"
    u, s, vh = torch.linalg.svd(task_vectors[1][key], full_matrices=False)
    torch.testing.assert_close(reconstructed[1][key], (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=1e-4)
    bias = "encoder.layers.1.mlp.fc1.bias"
    torch.testing.assert_close(reconstructed[2][bias], task_vectors[2][bias])  # 1-D kept as is
    reference = build(vision_config(), dense, task_vectors=reconstructed)
    reference.load_state_dict({k: v for k, v in svd.state_dict().items() if "router" in k}, strict=False)
    x = pixels(4)
    with torch.no_grad():
        torch.testing.assert_close(svd(x).last_hidden_state, reference(x).last_hidden_state, atol=1e-5, rtol=1e-5)


def folder_bytes(path):
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def task_vector_bytes(model):
    return sum(
        t.numel() * t.element_size()
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if ".task_vectors." in name
    )


def test_pruned_model_is_stored_sparsely_on_disk_and_in_memory(tmp_path):
    # Eight tasks, as in the paper: the pretrained MLP, kept dense, is then a ninth of the dense experts' bytes.
    dense = dense_tower()
    dense_model = build(vision_config(num_tasks=8, router_depth=1), dense)
    pruned = build(vision_config(num_tasks=8, router_depth=1, task_vector_format="pruned", prune_ratio=0.9), dense)
    dense_model.save_pretrained(tmp_path / "dense")
    pruned.save_pretrained(tmp_path / "pruned")
    assert folder_bytes(tmp_path / "pruned") <= 0.35 * folder_bytes(tmp_path / "dense")
    assert task_vector_bytes(pruned) <= 0.2 * task_vector_bytes(dense_model)
    loaded = WEMoECLIPVisionModel.from_pretrained(tmp_path / "pruned").eval()
    assert loaded.encoder.layers[0].mlp.task_vectors.fc1_weight_columns.dtype == torch.int16
    x = pixels(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).pooler_output, pruned(x).pooler_output, atol=0, rtol=0)


def test_router_init_per_depth():
    config = WEMoEVisionConfig(**{**TINY, "hidden_size": 64, "num_attention_heads": 2}, num_tasks=5, init_lambda=0.4)
    for depth in (0, 1, 2):
        config.router_depth = depth
        router = WEMoECLIPVisionModel(config).encoder.layers[0].mlp.router
        assert isinstance(router, WEMoERouter)
        if depth == 0:
            torch.testing.assert_close(router.weight.data, torch.full((5,), 0.4))
        elif depth == 1:
            assert 0.007 < router.fc.weight.std() < 0.013 and router.fc.weight.shape == (5, 64)
            torch.testing.assert_close(router.fc.bias.data, torch.full((5,), 0.4))
        else:
            assert 0.009 < router.fc1.weight.std() < 0.011 and router.fc1.weight.shape == (64, 64)
            assert 0.007 < router.fc2.weight.std() < 0.013
            torch.testing.assert_close(router.fc1.bias.data, torch.zeros(64))
            torch.testing.assert_close(router.fc2.bias.data, torch.full((5,), 0.4))
        # Not softmaxed: every task starts near init_lambda, the sum far from 1.
        weights = router(torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0)))
        assert weights.shape == (2, 5)
        torch.testing.assert_close(weights, torch.full((2, 5), 0.4), atol=0.1, rtol=0)


def test_shared_router_is_one_router_object_saved_once(tmp_path):
    model = build(vision_config(router_depth=2, shared_router=True))
    routers = {id(layer.mlp.router) for layer in model.encoder.layers}
    assert routers == {id(model.encoder.router)}
    router_params = [name for name, _ in model.named_parameters() if "router" in name]
    assert router_params == [f"encoder.router.{n}" for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
    model.save_pretrained(tmp_path)
    loaded = WEMoECLIPVisionModel.from_pretrained(tmp_path).eval()
    assert {id(layer.mlp.router) for layer in loaded.encoder.layers} == {id(loaded.encoder.router)}
    torch.testing.assert_close(loaded.encoder.router.fc2.weight, model.encoder.router.fc2.weight)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels()).pooler_output, model(pixels()).pooler_output, atol=0, rtol=0)


def test_routing_weights_are_per_block_per_sample_fp32_even_in_bf16():
    model = build(vision_config(router_depth=2, moe_layers=[1]))
    assert not isinstance(model.encoder.layers[0].mlp, WEMoEMLP) and isinstance(model.encoder.layers[1].mlp, WEMoEMLP)
    with torch.no_grad():
        assert model(pixels()).routing_weights is None
        out = model(pixels(3), output_routing_weights=True)
        assert len(out.routing_weights) == 1 and out.routing_weights[0].shape == (3, 3)
        model.config.output_routing_weights = True
        assert len(model(pixels(2)).routing_weights) == 1
        half = model.to(torch.bfloat16)(pixels(2).bfloat16())
    assert half.routing_weights[0].dtype == torch.float32 and half.last_hidden_state.dtype == torch.bfloat16
    projected = WEMoECLIPVisionModelWithProjection(vision_config()).eval()
    out = projected(pixels(2), output_routing_weights=True)
    assert out.image_embeds.shape == (2, 512) and [w.shape for w in out.routing_weights] == [(2, 3), (2, 3)]


def test_joint_model_config_views_auto_classes_and_zero_shot_logits():
    config = WEMoEConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1),
        vision_config=TINY,
        projection_dim=8,
        num_tasks=2,
        shared_router=True,
    )
    assert config.vision_config.num_tasks == 2 and config.shared_router is True
    assert isinstance(AutoConfig.for_model("we_moe"), WEMoEConfig)
    model = AutoModel.from_config(config).eval()
    assert isinstance(model, WEMoECLIPModel)
    input_ids = torch.tensor([[0, 5, 6, 2], [0, 7, 8, 2]])
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixels(3), output_routing_weights=True)
        assert out.logits_per_image.shape == (3, 2) and [w.shape for w in out.routing_weights] == [(3, 2)] * 2
        assert model(input_ids=input_ids, pixel_values=pixels(3)).routing_weights is None
        features = model.get_image_features(pixels(3)).pooler_output
    torch.testing.assert_close(F.normalize(features, dim=-1), F.normalize(out.image_embeds, dim=-1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_tasks=0), "num_tasks"),
        (dict(task_names=["a", "b"]), "task_names"),
        (dict(router_depth=3), "router_depth"),
        (dict(task_vector_format="sparse"), "task_vector_format"),
        (dict(prune_ratio=1.0), "prune_ratio"),
        (dict(task_vector_format="svd"), "svd_rank_fraction"),
        (dict(svd_rank_fraction=1.5), "svd_rank_fraction"),
        (dict(moe_layers=[5]), "moe_layers"),
    ],
)
def test_bad_config_values_are_refused_naming_the_field(kwargs, match):
    with pytest.raises(StrictDataclassClassValidationError, match=match):
        vision_config(**kwargs)


def test_joint_fields_set_one_by_one_are_validated_when_the_model_is_built():
    config = WEMoEConfig(vision_config=TINY)
    config.task_vector_format = "svd"  # inconsistent until the fraction is set too
    with pytest.raises(ValueError, match="svd_rank_fraction"):
        WEMoECLIPVisionModel(config.vision_config)
    config.svd_rank_fraction = 0.5
    model = WEMoECLIPVisionModel(config.vision_config)
    assert model.encoder.layers[0].mlp.task_vectors.fc1_weight_u.shape == (1, 128, 8)


def test_bad_task_vectors_are_refused():
    dense = dense_tower()
    pretrained, task_vectors = mlp_dicts(dense, 3)
    model = WEMoECLIPVisionModel(vision_config())
    with pytest.raises(ValueError, match="num_tasks=3"):
        model.load_task_vectors(pretrained, task_vectors[:2])
    task_vectors[1]["encoder.layers.1.mlp.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="task vector 1 'fc1.weight' has shape"):
        model.load_task_vectors(pretrained, task_vectors)
    del pretrained["encoder.layers.0.mlp.fc2.bias"]
    with pytest.raises(KeyError, match="encoder.layers.0.mlp.fc2.bias"):
        model.load_task_vectors(pretrained, task_vectors)
