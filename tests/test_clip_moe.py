"""CLIPMoEModel: equivalence to its dense base, losses, router-only training, attention and checkpointing."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, CLIPModel
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

import hf_moe.modeling  # noqa: F401  (registers the Auto classes)
from hf_moe.modeling import (
    CLIPMoEConfig,
    CLIPMoEModel,
    CLIPMoETextModel,
    CLIPMoETextModelWithProjection,
    CLIPMoEVisionModel,
    CLIPMoEVisionModelWithProjection,
    stretch_text_positions,
)
from hf_moe.modeling.moe import MOE_FIELD_NAMES

from conftest import experts_implementations
from helpers import clip_inputs


@pytest.mark.parametrize("implementation", experts_implementations())
def test_sparse_upcycled_model_computes_the_dense_function(toy_clip_dir, upcycled_dir, implementation):
    dense = CLIPModel.from_pretrained(toy_clip_dir).eval()
    moe = CLIPMoEModel.from_pretrained(upcycled_dir, experts_implementation=implementation).eval()
    assert moe.config.vision_config._experts_implementation == implementation
    inputs = clip_inputs(dense.config, pad=3)
    with torch.no_grad():
        for method, kwargs in [
            ("get_image_features", {"pixel_values": inputs["pixel_values"]}),
            ("get_text_features", {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}),
        ]:
            expected = getattr(dense, method)(**kwargs).pooler_output
            actual = getattr(moe, method)(**kwargs).pooler_output
            assert (actual - expected).abs().max().item() <= 1e-5, method
        torch.testing.assert_close(moe(**inputs).logits_per_image, dense(**inputs).logits_per_image, atol=1e-4, rtol=0)


def test_routers_differ_from_dense_but_are_small(upcycled_dir):
    moe = CLIPMoEModel.from_pretrained(upcycled_dir)
    routers = {name: p for name, p in moe.named_parameters() if name.endswith("mlp.router.weight")}
    assert len(routers) == 4  # 2 text + 2 vision blocks, all MoE by default
    for weight in routers.values():
        assert 0 < weight.std().item() < 0.1


def test_auto_classes_resolve_in_process(upcycled_dir):
    assert type(AutoConfig.from_pretrained(upcycled_dir)) is CLIPMoEConfig
    assert type(AutoModel.from_pretrained(upcycled_dir)) is CLIPMoEModel
    assert type(AutoModelForZeroShotImageClassification.from_pretrained(upcycled_dir)) is CLIPMoEModel


def test_forward_returns_router_logits_and_aux_loss_equal_to_mixtral(upcycled_dir):
    moe = CLIPMoEModel.from_pretrained(upcycled_dir).eval()
    inputs = clip_inputs(moe.config, pad=4)
    out = moe(**inputs, return_loss=True, output_router_logits=True)
    config = moe.config
    vision = load_balancing_loss_func(out.vision_router_logits, config.num_local_experts, config.num_experts_per_tok)
    text = load_balancing_loss_func(
        out.text_router_logits, config.num_local_experts, config.num_experts_per_tok, inputs["attention_mask"]
    )
    torch.testing.assert_close(out.aux_loss, vision + text)
    plain = moe(**inputs, return_loss=True)
    assert plain.aux_loss is None and plain.vision_router_logits is None
    torch.testing.assert_close(out.loss, plain.loss + config.router_aux_loss_coef * (vision + text))
    assert len(out.vision_router_logits) == config.vision_config.num_hidden_layers
    assert out.vision_router_logits[0].shape == (3 * (1 + (32 // 8) ** 2), config.num_local_experts)


def test_router_z_loss_is_added_when_enabled(upcycled_dir):
    moe = CLIPMoEModel.from_pretrained(upcycled_dir, router_z_loss_coef=0.5).eval()
    assert moe.config.text_config.router_z_loss_coef == 0.5
    inputs = clip_inputs(moe.config)
    with_z = moe(**inputs, return_loss=True, output_router_logits=True).loss
    moe.config.vision_config.router_z_loss_coef = moe.config.text_config.router_z_loss_coef = 0.0
    without_z = moe(**inputs, return_loss=True, output_router_logits=True).loss
    assert with_z > without_z


def test_router_training_default_freezes_all_but_the_routers(upcycled_dir):
    from hf_moe.clip_moe.trainer import CLIPMoETrainingArguments
    from hf_moe.training import freeze_all_but

    moe = CLIPMoEModel.from_pretrained(upcycled_dir).train()
    towers = ("text_model", "vision_model")
    routers = {f"{tower}.encoder.layers.{i}.mlp.router.weight" for tower in towers for i in (0, 1)}
    default_patterns = CLIPMoETrainingArguments.__dataclass_fields__["trainable_parameters"].default_factory()
    assert set(freeze_all_but(moe, default_patterns)) == routers
    assert {name for name, p in moe.named_parameters() if p.requires_grad} == routers
    out = moe(**clip_inputs(moe.config, pad=2), return_loss=True, output_router_logits=True)
    out.loss.backward()
    for name, parameter in moe.named_parameters():
        if name in routers:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_balance_loss_alone_reaches_the_routers(upcycled_dir):
    moe = CLIPMoEModel.from_pretrained(upcycled_dir).train()
    out = moe(**clip_inputs(moe.config), output_router_logits=True)
    out.aux_loss.backward()
    router_grads = [p.grad for n, p in moe.named_parameters() if n.endswith("router.weight")]
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads)


def test_sdpa_and_eager_attention_agree(upcycled_dir):
    inputs = clip_inputs(AutoConfig.from_pretrained(upcycled_dir), pad=3)
    logits = {}
    for attn in ("eager", "sdpa"):
        model = CLIPMoEModel.from_pretrained(upcycled_dir, attn_implementation=attn).eval()
        assert model.config.text_config._attn_implementation == attn
        logits[attn] = model(**inputs).logits_per_image
    torch.testing.assert_close(logits["sdpa"], logits["eager"], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(upcycled_dir):
    inputs = clip_inputs(AutoConfig.from_pretrained(upcycled_dir))
    grads = []
    for checkpointing in (False, True):
        model = CLIPMoEModel.from_pretrained(upcycled_dir).train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable()
            assert model.vision_model.encoder.layers[0].gradient_checkpointing
        out = model(**inputs, return_loss=True, output_router_logits=True)
        assert len(out.text_router_logits) == 2  # recomputation must not record the logits twice
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


TOWER_MODELS = {
    CLIPMoETextModel: ("text_model.", "text"),
    CLIPMoEVisionModel: ("vision_model.", "vision"),
    CLIPMoETextModelWithProjection: ("", "text"),
    CLIPMoEVisionModelWithProjection: ("", "vision"),
}


@pytest.mark.parametrize("tower_class", TOWER_MODELS, ids=lambda cls: cls.__name__)
def test_tower_models_load_their_weights_from_a_joint_folder(upcycled_dir, tower_class):
    prefix, modality = TOWER_MODELS[tower_class]
    joint = CLIPMoEModel.from_pretrained(upcycled_dir).eval()
    with CaptureLogger(logging.get_logger("transformers.modeling_utils")) as captured:
        tower, info = tower_class.from_pretrained(upcycled_dir, output_loading_info=True)
    assert not info["missing_keys"] and "MISSING" not in captured.out
    joint_weights = joint.state_dict()
    for name, tensor in tower.state_dict().items():  # the projections of *WithProjection included
        assert torch.equal(tensor, joint_weights[prefix + name]), name

    inputs = clip_inputs(joint.config, pad=2)
    with torch.no_grad():
        if modality == "text":
            text_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            out = tower.eval()(**text_inputs, output_router_logits=True)
            joint_out = joint.text_model(**text_inputs, output_router_logits=True)
            expected = joint.get_text_features(**text_inputs).pooler_output
        else:
            out = tower.eval()(pixel_values=inputs["pixel_values"], output_router_logits=True)
            joint_out = joint.vision_model(pixel_values=inputs["pixel_values"], output_router_logits=True)
            expected = joint.get_image_features(inputs["pixel_values"]).pooler_output
    if prefix:  # a bare tower
        torch.testing.assert_close(out.pooler_output, joint_out.pooler_output, atol=0, rtol=0)
    else:
        torch.testing.assert_close(out.text_embeds if modality == "text" else out.image_embeds, expected)
        assert out.aux_loss is not None
    assert len(out.router_logits) == 2
    for logits, joint_logits in zip(out.router_logits, joint_out.router_logits):
        torch.testing.assert_close(logits, joint_logits, atol=0, rtol=0)


def long_clip_reference(positional_embedding, keep_len=20):
    """Long-CLIP's own stretch, written as its loop."""
    length, width = positional_embedding.shape
    out = torch.zeros(4 * length - 3 * keep_len, width)
    for i in range(keep_len):
        out[i] = positional_embedding[i]
    for i in range(length - 1 - keep_len):
        for j in range(4):
            out[4 * i + j + keep_len] = (4 - j) * positional_embedding[i + keep_len] / 4 + j * positional_embedding[
                i + 1 + keep_len
            ] / 4
    for j in range(4):
        last, before = positional_embedding[length - 1], positional_embedding[length - 2]
        out[length - 1 + 3 * (length - 1 - keep_len) + j] = last + j * (last - before) / 4
    return out


def test_long_clip_position_stretch_matches_the_reference_loop():
    positions = torch.randn(77, 8)
    stretched = stretch_text_positions(positions)
    assert stretched.shape == (248, 8)
    torch.testing.assert_close(stretched, long_clip_reference(positions))


def test_long_text_upcycling_gives_248_positions(toy_clip_dir, tmp_path):
    from transformers import AutoProcessor

    from hf_moe.conversion import upcycle_clip

    model = upcycle_clip(toy_clip_dir, tmp_path / "long", num_experts=2, top_k=1, long_text=True)
    assert model.config.long_text and model.config.text_config.max_position_embeddings == 248
    dense = CLIPModel.from_pretrained(toy_clip_dir)
    expected = stretch_text_positions(dense.text_model.embeddings.position_embedding.weight)
    torch.testing.assert_close(model.text_model.embeddings.position_embedding.weight, expected)
    processor = AutoProcessor.from_pretrained(tmp_path / "long")
    assert processor.tokenizer.model_max_length == 248
    ids = processor(text=["a " * 300], return_tensors="pt", truncation=True)["input_ids"]
    assert ids.shape[1] == 248
    with torch.no_grad():
        assert model.get_text_features(input_ids=ids).pooler_output.isfinite().all()


def test_loading_with_an_impossible_top_k_is_refused(upcycled_dir):
    with pytest.raises(ValueError, match="num_experts_per_tok=5 must be between 1 and num_local_experts=4"):
        CLIPMoEModel.from_pretrained(upcycled_dir, num_experts_per_tok=5)


def per_tower_config(upcycled_dir):
    """The upcycled model's config with the official recipe's per-tower settings: the towers differ."""
    config = CLIPMoEConfig.from_pretrained(upcycled_dir)
    config.vision_config.expert_dropout, config.text_config.expert_dropout = 0.1, 0.0
    config.vision_config.router_aux_loss_coef, config.text_config.router_aux_loss_coef = 0.01, 0.005
    return config


def test_per_tower_moe_values_survive_save_and_load(upcycled_dir, tmp_path):
    model = CLIPMoEModel.from_pretrained(upcycled_dir, config=per_tower_config(upcycled_dir))
    model.save_pretrained(tmp_path)
    for loaded in (CLIPMoEConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert (loaded.vision_config.expert_dropout, loaded.text_config.expert_dropout) == (0.1, 0.0)
        assert (loaded.vision_config.router_aux_loss_coef, loaded.text_config.router_aux_loss_coef) == (0.01, 0.005)
        # The joint view: None where the towers differ, their common value where they agree.
        assert loaded.expert_dropout is None and loaded.router_aux_loss_coef is None
        assert loaded.num_local_experts == 4 and loaded.num_experts_per_tok == 2
    reloaded = CLIPMoEModel.from_pretrained(tmp_path)
    assert reloaded.vision_model.encoder.layers[0].mlp.experts.act_fn.dropout.p == 0.1
    assert reloaded.text_model.encoder.layers[0].mlp.experts.act_fn.dropout.p == 0.0


def test_a_joint_moe_value_sets_both_towers(upcycled_dir, tmp_path):
    config = CLIPMoEConfig(expert_dropout=0.1, num_local_experts=3)
    assert config.text_config.expert_dropout == config.vision_config.expert_dropout == config.expert_dropout == 0.1
    assert config.text_config.num_local_experts == config.vision_config.num_local_experts == 3

    per_tower_config(upcycled_dir).save_pretrained(tmp_path)
    loaded = CLIPMoEConfig.from_pretrained(tmp_path, expert_dropout=0.3)
    assert loaded.text_config.expert_dropout == loaded.vision_config.expert_dropout == loaded.expert_dropout == 0.3
    model = CLIPMoEModel.from_pretrained(upcycled_dir, router_aux_loss_coef=0.02)
    assert model.config.text_config.router_aux_loss_coef == model.config.vision_config.router_aux_loss_coef == 0.02

    loaded.router_aux_loss_coef = 0.05
    assert loaded.text_config.router_aux_loss_coef == loaded.vision_config.router_aux_loss_coef == 0.05
    loaded.router_aux_loss_coef = None  # "not given": the towers keep their values
    assert loaded.router_aux_loss_coef == 0.05
    # Joint values are views of the towers, never saved: config.json holds the towers' values only.
    assert not {name for name in MOE_FIELD_NAMES if name in loaded.to_dict()}
    assert all(isinstance(getattr(CLIPMoEConfig, name), property) for name in MOE_FIELD_NAMES)


def test_router_loss_weighs_each_tower_with_its_own_coefficients(upcycled_dir, tmp_path):
    config = per_tower_config(upcycled_dir)
    config.vision_config.router_z_loss_coef = 0.5
    CLIPMoEModel.from_pretrained(upcycled_dir, config=config).save_pretrained(tmp_path)
    moe = CLIPMoEModel.from_pretrained(tmp_path).eval()
    inputs = clip_inputs(moe.config, pad=3)
    out = moe(**inputs, return_loss=True, output_router_logits=True)
    experts, top_k = moe.config.num_local_experts, moe.config.num_experts_per_tok
    vision = load_balancing_loss_func(out.vision_router_logits, experts, top_k)
    text = load_balancing_loss_func(out.text_router_logits, experts, top_k, inputs["attention_mask"])
    vision_z = torch.cat(out.vision_router_logits).logsumexp(-1).square().mean()
    expected = 0.01 * vision + 0.005 * text + 0.5 * vision_z
    torch.testing.assert_close(out.router_loss, expected)
    torch.testing.assert_close(out.aux_loss, vision + text)
    torch.testing.assert_close(out.loss, moe(**inputs, return_loss=True).loss + expected)


def test_each_tower_follows_its_own_output_router_logits(upcycled_dir):
    moe = CLIPMoEModel.from_pretrained(upcycled_dir).eval()
    moe.config.vision_config.output_router_logits = True
    assert moe.config.output_router_logits is None
    inputs = clip_inputs(moe.config)
    out = moe(**inputs)
    assert len(out.vision_router_logits) == 2 and out.text_router_logits is None
    vision = load_balancing_loss_func(out.vision_router_logits, 4, 2)
    torch.testing.assert_close(out.aux_loss, vision)
    torch.testing.assert_close(out.router_loss, 0.01 * vision)
    assert moe(**inputs, output_router_logits=False).vision_router_logits is None
