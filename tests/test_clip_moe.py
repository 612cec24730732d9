"""CLIPMoEModel: equivalence to its dense base, losses, router-only training, attention and checkpointing."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, CLIPModel
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import hf_moe.modeling  # noqa: F401  (registers the Auto classes)
from hf_moe.modeling import (
    CLIPMoEConfig,
    CLIPMoEModel,
    CLIPMoETextModelWithProjection,
    CLIPMoEVisionModelWithProjection,
    stretch_text_positions,
)

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


def test_freezing_all_but_routers_trains_exactly_the_routers(upcycled_dir):
    moe = CLIPMoEModel.from_pretrained(upcycled_dir).train()
    for name, parameter in moe.named_parameters():
        parameter.requires_grad_("router" in name.split("."))
    trainable = [name for name, p in moe.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(".mlp.router.weight") for name in trainable)
    assert sum(p.numel() for p in moe.parameters() if p.requires_grad) == 4 * 4 * 32
    out = moe(**clip_inputs(moe.config, pad=2), return_loss=True, output_router_logits=True)
    out.loss.backward()
    for name, parameter in moe.named_parameters():
        if parameter.requires_grad:
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


def test_tower_models_with_projection_match_the_joint_model(upcycled_dir):
    joint = CLIPMoEModel.from_pretrained(upcycled_dir).eval()
    vision = CLIPMoEVisionModelWithProjection.from_pretrained(upcycled_dir).eval()
    text = CLIPMoETextModelWithProjection.from_pretrained(upcycled_dir).eval()
    inputs = clip_inputs(joint.config)
    with torch.no_grad():
        image_out = vision(pixel_values=inputs["pixel_values"], output_router_logits=True)
        torch.testing.assert_close(
            image_out.image_embeds, joint.get_image_features(inputs["pixel_values"]).pooler_output
        )
        assert image_out.aux_loss is not None and len(image_out.router_logits) == 2
        text_out = text(input_ids=inputs["input_ids"])
        torch.testing.assert_close(text_out.text_embeds, joint.get_text_features(inputs["input_ids"]).pooler_output)


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
