"""LoRA on CLIP-MoE with PEFT: attention projections and packed experts adapted, routers optionally trained,
training through CLIPMoETrainer, every experts implementation seeing the adapters, and merging back into a plain
CLIP-MoE folder that loads with and without hf-moe's classes."""

import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from transformers import AutoModel, AutoProcessor

from hf_moe.clip_moe.lora import clip_moe_lora_config, lora_trainable_parameters, merge_lora_into_folder
from hf_moe.clip_moe.trainer import CLIPMoETrainer, CLIPMoETrainingArguments
from hf_moe.modeling import CLIPMoEModel
from hf_moe.toy_data import digit_caption, digit_images
from hf_moe.training import freeze_all_but

from conftest import experts_implementations
from helpers import clip_inputs, run_without_hf_moe


FRESH_PROCESS = textwrap.dedent(
    """
    import torch
    from transformers import AutoModel

    folder, workdir = sys.argv[1], sys.argv[2]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        logits = model(**torch.load(f"{workdir}/inputs.pt")).logits_per_image
    torch.save(logits, f"{workdir}/logits.pt")
    assert not any(name.split(".")[0] in ("hf_moe", "peft") for name in sys.modules)
    """
)


def lora_model(upcycled_dir, implementation="eager", seed=0, **config_kwargs):
    model = CLIPMoEModel.from_pretrained(upcycled_dir, experts_implementation=implementation)
    torch.manual_seed(seed)
    return get_peft_model(model, clip_moe_lora_config(r=4, alpha=8, **config_kwargs))


def randomize_lora_b(peft_model, seed=0):
    """LoRA B starts at zero (the adapter is a no-op); give it values so the adapter matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def outputs(model, inputs):
    with torch.no_grad():
        out = model.eval()(**inputs, output_router_logits=True)
    return out


@pytest.fixture(scope="module")
def trained(upcycled_dir, tmp_path_factory):
    """A LoRA + router model trained for 3 steps with CLIPMoETrainer, and its parameters before training."""
    config = clip_moe_lora_config(r=4, alpha=8, routers_trainable=True)
    torch.manual_seed(0)
    peft_model = get_peft_model(CLIPMoEModel.from_pretrained(upcycled_dir), config)
    before = {name: parameter.detach().clone() for name, parameter in peft_model.named_parameters()}

    processor = AutoProcessor.from_pretrained(upcycled_dir)
    images, labels = digit_images(16)
    rows = [{"image": image, "text": digit_caption(label, i)} for i, (image, label) in enumerate(zip(images, labels))]

    def collate(batch):
        encoded = processor(
            text=[row["text"] for row in batch],
            images=[row["image"] for row in batch],
            return_tensors="pt",
            padding=True,
        )
        return {key: encoded[key] for key in ("input_ids", "attention_mask", "pixel_values")}

    args = CLIPMoETrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("lora-run")),
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        trainable_parameters=lora_trainable_parameters(config),
    )
    CLIPMoETrainer(model=peft_model, args=args, train_dataset=rows, data_collator=collate).train()
    return peft_model.eval(), before


def test_config_targets_attention_and_experts():
    config = clip_moe_lora_config()
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert config.target_parameters == ["mlp.experts.up_proj", "mlp.experts.down_proj"]
    assert not config.modules_to_save
    assert clip_moe_lora_config(routers_trainable=True).modules_to_save == ["router"]
    experts_only = clip_moe_lora_config(attention=False)
    assert not experts_only.target_modules and experts_only.target_parameters
    assert not clip_moe_lora_config(experts=False).target_parameters
    with pytest.raises(ValueError, match="dropout"):
        clip_moe_lora_config(dropout=0.1)
    assert clip_moe_lora_config(dropout=0.1, experts=False).lora_dropout == 0.1
    with pytest.raises(ValueError, match="attention=True or experts=True"):
        clip_moe_lora_config(attention=False, experts=False)


@pytest.mark.parametrize("routers_trainable", [False, True])
def test_exactly_lora_and_router_parameters_train(upcycled_dir, routers_trainable):
    peft_model = lora_model(upcycled_dir, routers_trainable=routers_trainable)
    base = peft_model.get_base_model()
    config = base.config
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert trainable and all(".lora_" in name or ".modules_to_save." in name for name in trainable)

    towers = (config.text_config, config.vision_config)
    num_blocks = sum(tower.num_hidden_layers for tower in towers)
    num_moe_blocks = sum(len(tower.moe_layer_indices()) for tower in towers)
    # Per block: q, k, v, out (A and B each); per MoE block: up_proj and down_proj (A and B each).
    assert sum(".lora_" in name for name in trainable) == 8 * num_blocks + 4 * num_moe_blocks
    routers = {name for name in trainable if ".modules_to_save." in name}
    assert len(routers) == (num_moe_blocks if routers_trainable else 0)
    assert all(name.endswith(".mlp.router.modules_to_save.default.weight") for name in routers)

    # The expert LoRA holds one rank-r pair per expert, shaped for (E, out, in) parameters.
    experts = base.vision_model.encoder.layers[0].mlp.experts
    num_experts, hidden = config.num_local_experts, config.vision_config.hidden_size
    intermediate = config.vision_config.intermediate_size
    assert experts.parameter_name == "down_proj" and experts.base_layer.parameter_name == "up_proj"
    assert experts.lora_A["default"].weight.shape == (4 * num_experts, intermediate)
    assert experts.lora_B["default"].weight.shape == (hidden, 4 * num_experts)
    assert experts.base_layer.lora_A["default"].weight.shape == (4 * num_experts, hidden)

    # The Trainer's patterns select the same set (and not the routers' frozen original_module).
    patterns = lora_trainable_parameters(peft_model.peft_config["default"])
    assert set(freeze_all_but(peft_model, patterns)) == trainable


@pytest.mark.parametrize("implementation", [impl for impl in experts_implementations() if impl != "eager"])
def test_expert_lora_reaches_every_experts_implementation(upcycled_dir, implementation):
    """Experts-only LoRA: it changes the outputs under each implementation, the outputs agree with eager, and
    so do the gradients of the LoRA factors."""
    inputs = clip_inputs(CLIPMoEModel.config_class.from_pretrained(upcycled_dir), pad=2)
    peft_model = lora_model(upcycled_dir, attention=False)
    randomize_lora_b(peft_model)
    base = peft_model.get_base_model()

    results = {}
    for impl in ("eager", implementation):
        base.set_experts_implementation(impl)
        assert base.vision_model.encoder.layers[0].mlp.experts.get_base_layer().config._experts_implementation == impl
        peft_model.zero_grad()
        out = peft_model.eval()(**inputs)
        (out.image_embeds.square().sum() + out.text_embeds.square().sum() * 0.5 + out.logits_per_image.sum()).backward()
        grads = {name: p.grad.clone() for name, p in peft_model.named_parameters() if p.grad is not None}
        with peft_model.disable_adapter():
            plain = outputs(peft_model, inputs)
        results[impl] = (outputs(peft_model, inputs), plain, grads)

    for impl, (adapted, plain, grads) in results.items():
        difference = (adapted.image_embeds - plain.image_embeds).abs().max()
        assert difference > 1e-3, f"the expert LoRA does not reach the {impl} experts forward"
        assert grads and all(".lora_" in name for name in grads)
        assert all(grad.abs().sum() > 0 for name, grad in grads.items() if ".mlp.experts." in name)
    eager, other = results["eager"], results[implementation]
    for field in ("image_embeds", "text_embeds", "logits_per_image"):
        torch.testing.assert_close(getattr(other[0], field), getattr(eager[0], field), atol=1e-5, rtol=1e-5)
    assert eager[2].keys() == other[2].keys()
    for name in eager[2]:
        torch.testing.assert_close(other[2][name], eager[2][name], atol=1e-5, rtol=1e-4)


def test_full_lora_outputs_agree_across_experts_implementations(upcycled_dir):
    inputs = clip_inputs(CLIPMoEModel.config_class.from_pretrained(upcycled_dir), pad=2)
    peft_model = lora_model(upcycled_dir, routers_trainable=True)
    randomize_lora_b(peft_model)
    base = peft_model.get_base_model()
    reference = None
    for impl in experts_implementations():
        base.set_experts_implementation(impl)
        out = outputs(peft_model, inputs)
        assert len(out.vision_router_logits) == len(base.config.vision_config.moe_layer_indices())
        if reference is None:
            reference = out
        else:
            torch.testing.assert_close(out.logits_per_image, reference.logits_per_image, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.aux_loss, reference.aux_loss, atol=1e-6, rtol=1e-6)


def test_trainer_changes_lora_and_router_weights_only(trained):
    peft_model, before = trained
    changed = {name for name, p in peft_model.named_parameters() if not torch.equal(before[name], p.detach())}
    lora = {name for name in before if ".lora_" in name}
    assert lora <= changed, f"LoRA weights left unchanged: {sorted(lora - changed)[:5]}"
    assert any(".mlp.experts." in name for name in changed) and any(".self_attn." in name for name in changed)
    routers = {name for name in before if ".modules_to_save." in name}
    assert routers and routers <= changed
    assert changed == lora | routers


def test_merged_folder_matches_the_peft_model(trained, upcycled_dir, tmp_path):
    peft_model, _ = trained
    inputs = clip_inputs(peft_model.get_base_model().config, pad=2)
    expected = outputs(peft_model, inputs)
    original = outputs(CLIPMoEModel.from_pretrained(upcycled_dir), inputs)

    merged = merge_lora_into_folder(peft_model, upcycled_dir, tmp_path / "merged")
    assert isinstance(merged, CLIPMoEModel)
    # By default a copy is merged: the PeftModel is untouched.
    assert isinstance(peft_model, PeftModel) and any(".lora_" in n for n, _ in peft_model.named_parameters())
    torch.testing.assert_close(outputs(peft_model, inputs).logits_per_image, expected.logits_per_image, atol=0, rtol=0)
    files = {path.name for path in (tmp_path / "merged").iterdir()}
    assert {"model.safetensors", "config.json", "modeling_clip_moe.py", "moe.py", "configuration_clip_moe.py"} <= files
    assert {"processor_config.json", "tokenizer.json", "README.md"} <= files
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".merged.tmp")]
    card = ModelCard.load(tmp_path / "merged" / "README.md")
    assert {"hf-moe", "mixture-of-experts", "lora"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert "rank 4" in card.text and "mlp.experts.up_proj" in card.text and str(upcycled_dir) in card.text

    from safetensors import safe_open

    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert keys == set(CLIPMoEModel.from_pretrained(upcycled_dir).state_dict())
    assert not [key for key in keys if "lora" in key or "base_layer" in key or "modules_to_save" in key]

    reloaded = CLIPMoEModel.from_pretrained(tmp_path / "merged")
    remote = AutoModel.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    assert type(remote).__name__ == "CLIPMoEModel"
    assert AutoProcessor.from_pretrained(tmp_path / "merged") is not None
    for model in (merged, reloaded, remote):
        out = outputs(model, inputs)
        for field in ("logits_per_image", "image_embeds", "text_embeds", "aux_loss"):
            torch.testing.assert_close(getattr(out, field), getattr(expected, field), atol=1e-5, rtol=1e-5)
    # A fresh process without hf_moe (and never importing peft) loads the folder through its remote code.
    torch.save(inputs, tmp_path / "inputs.pt")
    run_without_hf_moe(FRESH_PROCESS, [tmp_path / "merged", tmp_path], tmp_path)
    fresh_logits = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(fresh_logits, expected.logits_per_image, atol=1e-5, rtol=1e-5)

    # Training really changed the model: attention, experts and routers.
    assert (expected.logits_per_image - original.logits_per_image).abs().max() > 1e-3
    merged_state, original_state = reloaded.state_dict(), CLIPMoEModel.from_pretrained(upcycled_dir).state_dict()
    for suffix in ("self_attn.q_proj.weight", "mlp.experts.up_proj", "mlp.experts.down_proj", "mlp.router.weight"):
        key = f"vision_model.encoder.layers.0.{suffix}"
        assert not torch.equal(merged_state[key], original_state[key]), key
    for suffix in ("mlp.experts.up_proj_bias", "self_attn.q_proj.bias", "layer_norm1.weight"):
        key = f"text_model.encoder.layers.1.{suffix}"
        assert torch.equal(merged_state[key], original_state[key]), key
    # Upcycled experts start identical; the per-expert LoRA makes them differ.
    up = merged_state["vision_model.encoder.layers.0.mlp.experts.up_proj"]
    assert not torch.equal(up[0], up[1])


def test_merge_from_a_saved_adapter_folder(trained, upcycled_dir, toy_clip_dir, tmp_path):
    peft_model, _ = trained
    inputs = clip_inputs(peft_model.get_base_model().config)
    expected = outputs(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "adapter")

    # base_model_dir=None: taken from the adapter config, which recorded the folder the model was loaded from.
    merged = merge_lora_into_folder(tmp_path / "adapter", None, tmp_path / "merged")
    reloaded = CLIPMoEModel.from_pretrained(tmp_path / "merged")
    assert reloaded.dtype == torch.float32
    for model in (merged, reloaded):
        torch.testing.assert_close(
            outputs(model, inputs).logits_per_image, expected.logits_per_image, atol=1e-5, rtol=1e-5
        )
    # A PeftModel merged in place; base_model_dir=None: the processor comes from the adapter's recorded base.
    reloaded_peft = PeftModel.from_pretrained(CLIPMoEModel.from_pretrained(upcycled_dir), tmp_path / "adapter")
    in_place = merge_lora_into_folder(reloaded_peft, None, tmp_path / "in-place", in_place=True)
    assert in_place is reloaded_peft.get_base_model()
    assert (tmp_path / "in-place" / "processor_config.json").is_file()
    torch.testing.assert_close(
        outputs(CLIPMoEModel.from_pretrained(tmp_path / "in-place"), inputs).logits_per_image,
        expected.logits_per_image,
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(FileExistsError):
        merge_lora_into_folder(tmp_path / "adapter", upcycled_dir, tmp_path / "merged")
    merge_lora_into_folder(tmp_path / "adapter", upcycled_dir, tmp_path / "merged", overwrite=True)
    merge_lora_into_folder(tmp_path / "adapter", upcycled_dir, tmp_path / "bf16", dtype=torch.bfloat16)
    bf16 = CLIPMoEModel.from_pretrained(tmp_path / "bf16")
    assert bf16.dtype == torch.bfloat16
    bf16_inputs = {**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)}
    torch.testing.assert_close(
        outputs(bf16, bf16_inputs).image_embeds.float(), expected.image_embeds, atol=3e-2, rtol=3e-2
    )
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge_lora_into_folder(upcycled_dir, upcycled_dir, tmp_path / "other")
    # --overwrite must not delete the adapter it reads (the output folder is the adapter, or holds it).
    for output in (tmp_path / "adapter", tmp_path):
        with pytest.raises(ValueError, match="would destroy that input"):
            merge_lora_into_folder(tmp_path / "adapter", upcycled_dir, output, overwrite=True)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    with pytest.raises(ValueError, match="not a CLIP-MoE"):
        merge_lora_into_folder(tmp_path / "adapter", toy_clip_dir, tmp_path / "dense")
    with pytest.raises(TypeError):
        merge_lora_into_folder(reloaded, upcycled_dir, tmp_path / "other")
