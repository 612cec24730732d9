"""One MoE core for every family (issue 16): MoIIE's routers, experts and block are moe.py's, with one eager dispatch;
`moe_layers` means the same in every config; MoIIE's output carries its LM loss and each modality's router logits, so
its trainer neither subtracts the balance term back out nor relies on the order of `router_logits`; MoDE initialises
weights through the shared helper without carrying moe.py."""

import json

import pytest
import torch
from test_moiie_model import batch, tiny_config, tiny_model
from test_moiie_training import data, trainer_for  # noqa: F401  (data: a fixture)

from hf_moe.modeling import (
    CLIPMoEVisionConfig,
    MoDEPreTrainedModel,
    MoIIEConfig,
    WEMoEVisionConfig,
    moe,
)
from hf_moe.modeling.modeling_moiie import MoIIESparseBlock


@pytest.mark.parametrize("variant", ["moiie", "vanilla", "modality"])
def test_moiie_block_is_moe_py_block_with_its_router_and_gated_experts(variant):
    model = tiny_model(variant=variant)
    blocks = [m for m in model.modules() if isinstance(m, MoIIESparseBlock)]
    assert blocks and all(isinstance(block, moe.MoESparseBlock) for block in blocks)
    block = blocks[0]
    assert isinstance(block.experts, moe.MoEGatedExperts)
    # one eager dispatch for every experts class: the packed MLP experts' and the gated experts' are the same function
    assert type(block.experts).__mro__[1].forward is moe.MoEExperts.forward is moe.MoEMLPExperts.__mro__[1].forward
    routers = {name: module for name, module in block.named_children() if isinstance(module, moe.MoETopKRouter)}
    config = model.config
    expected = {
        "moiie": {
            "vision_router": config.num_vision_experts + config.num_shared_experts,
            "language_router": config.num_shared_experts + config.num_language_experts,
        },
        "vanilla": {"router": config.num_local_experts},
        "modality": {},
    }[variant]
    assert {name: router.num_experts for name, router in routers.items()} == expected
    assert all(router.top_k == config.num_experts_per_tok and router.norm_topk_prob for router in routers.values())


def test_router_takes_sizes_and_checks_them():
    sizes = type("Sizes", (), {"hidden_size": 8})()
    router = moe.MoETopKRouter(sizes, num_experts=3, top_k=2, norm_topk_prob=False)
    assert (router.num_experts, router.top_k, router.norm_topk_prob) == (3, 2, False)
    assert tuple(router.weight.shape) == (3, 8)
    with pytest.raises(ValueError, match="num_experts_per_tok=4"):
        moe.MoETopKRouter(sizes, num_experts=3, top_k=4, norm_topk_prob=True)


def test_eager_dispatch_sums_each_tokens_choices_in_choice_order():
    # The one eager path: per token, the k weighted expert outputs summed in (token, choice) order, no index_add_.
    sizes = type("Sizes", (), {"hidden_size": 4, "intermediate_size": 6, "hidden_act": "silu"})()
    torch.manual_seed(0)
    experts = moe.MoEGatedExperts(sizes, num_experts=5)
    for parameter in experts.parameters():
        torch.nn.init.normal_(parameter)
    experts.config._experts_implementation = "eager"
    hidden = torch.randn(7, 4)
    index = torch.stack([torch.randperm(5)[:3] for _ in range(7)])
    weights = torch.rand(7, 3)
    expected = torch.stack(
        [
            sum((weights[t, c] * experts.expert_forward(int(index[t, c]), hidden[t : t + 1])[0] for c in range(3)))
            for t in range(7)
        ]
    )
    out = experts(hidden, index, weights)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(experts(hidden, index, weights), out)  # deterministic


@pytest.mark.parametrize("moe_layers", [None, 0, 2, [3, 1], [0]])
def test_moe_layers_means_the_same_in_every_config(moe_layers):
    towers = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2)
    clip_moe = CLIPMoEVisionConfig(**towers, moe_layers=moe_layers)
    we_moe = WEMoEVisionConfig(**towers, moe_layers=moe_layers)
    assert clip_moe.moe_layer_indices() == we_moe.moe_layer_indices() == moe.resolve_moe_layers(moe_layers, 4)
    moiie = tiny_config(moe_layers=moe_layers)  # 4 decoder layers; MoIIE's default (None): the odd ones
    expected = [1, 3] if moe_layers is None else moe.resolve_moe_layers(moe_layers, 4)
    assert moiie.moe_layer_indices() == expected
    assert sorted(moiie.moe_layers) == expected  # an int or None is stored as the layers it names
    model = tiny_model(moe_layers=moe_layers)
    assert [i for i, layer in enumerate(model.model.language_model.layers) if layer.is_moe] == expected


def test_configs_saved_before_load_to_the_same_layers(tmp_path):
    config = tiny_config(moe_layers=[3, 1])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["moe_layers"] == [3, 1]  # a list is kept as given
    loaded = MoIIEConfig.from_pretrained(tmp_path)
    assert loaded.moe_layers == [3, 1] and loaded.moe_layer_indices() == [1, 3]
    with pytest.raises(ValueError, match="moe_layers"):
        tiny_config(moe_layers=5)


@pytest.mark.parametrize("variant", ["moiie", "vanilla"])
def test_moiie_output_carries_the_lm_loss_and_each_modalitys_router_logits(variant):
    model = tiny_model(variant=variant)
    inputs = batch(pad=2)
    with torch.no_grad():
        plain = model(**inputs, labels=inputs["input_ids"], output_router_logits=False)
    seen = {}
    hooks = [
        module.register_forward_hook(lambda module, args, out, name=name: seen.setdefault(name, []).append(out[0]))
        for name, module in model.named_modules()
        if isinstance(module, moe.MoETopKRouter)
    ]
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"], output_router_logits=True)
    for hook in hooks:
        hook.remove()
    assert torch.equal(out.lm_loss, plain.loss) and plain.lm_loss is plain.loss
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.router_aux_loss_coef * out.aux_loss)
    routers = {"moiie": ("vision_router", "language_router"), "vanilla": ("router", "router")}[variant]
    for modality, router in zip(("vision", "language"), routers):
        expected = [logits for name, calls in seen.items() if name.endswith(f".mlp.{router}") for logits in calls]
        got = getattr(out, f"{modality}_router_logits")
        assert len(got) == len(model.config.moe_layers) and all(map(torch.equal, got, expected))


def test_trainer_reads_the_lm_loss_and_router_logits_by_name(tmp_path, data, monkeypatch):  # noqa: F811
    trainer = trainer_for(tmp_path, data, stage="finetune", log_expert_load="full")
    model = trainer.model.train()
    inputs = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(model, inputs)
    recorded = trainer._pop_recorded()
    with torch.no_grad():
        reference = model(**inputs, output_router_logits=True)
    expected = reference.lm_loss + model.config.router_aux_loss_coef * reference.aux_loss
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=0)

    forward = model.forward

    def scrambled(**kwargs):
        # The loss as a whole and the order of `router_logits` are not what the trainer may read.
        outputs = forward(**kwargs)
        outputs.loss = torch.full_like(outputs.loss, float("nan"))
        outputs.router_logits = outputs.router_logits[::-1]
        return outputs

    monkeypatch.setattr(model, "forward", scrambled)
    assert torch.equal(trainer.compute_loss(model, inputs).detach(), loss.detach())
    again = trainer._pop_recorded()
    assert again.keys() == recorded.keys() and any(name.startswith("expert_load/") for name in again)
    assert all(again[name] == recorded[name] for name in recorded)


def test_mode_initialises_through_the_shared_helper_without_moe_py():
    assert MoDEPreTrainedModel.is_custom_code()  # transformers' own answer, not overridden
    assert MoDEPreTrainedModel.initialize_weights.__qualname__.startswith("InitializeAsTransformersMixin")
    from pathlib import Path

    import hf_moe.modeling.modeling_mode as modeling_mode

    source = Path(modeling_mode.__file__).read_text()
    assert "from .moe import" not in source and "from .weight_init import" in source


def test_clip_moe_and_we_moe_share_the_clip_scaffolding_and_save_it(tmp_path):
    from hf_moe.modeling import (
        CLIPMoEConfig,
        CLIPMoEModel,
        CLIPMoEPreTrainedModel,
        CLIPMoEVisionModel,
        CLIPMoEVisionModelWithProjection,
        WEMoECLIPModel,
        WEMoECLIPVisionModel,
        WEMoECLIPVisionModelWithProjection,
        WEMoEConfig,
        WEMoEPreTrainedModel,
        clip_towers,
    )

    shared = [
        (CLIPMoEVisionModel, WEMoECLIPVisionModel, clip_towers.CLIPFamilyVisionModel),
        (
            CLIPMoEVisionModelWithProjection,
            WEMoECLIPVisionModelWithProjection,
            clip_towers.CLIPFamilyVisionModelWithProjection,
        ),
        (CLIPMoEModel, WEMoECLIPModel, clip_towers.CLIPFamilyModel),
    ]
    for clip_moe, we_moe, base in shared:
        assert issubclass(clip_moe, base) and issubclass(we_moe, base)
        assert "__init__" not in vars(clip_moe) and "__init__" not in vars(we_moe)  # one constructor, the base's
    for family in (CLIPMoEPreTrainedModel, WEMoEPreTrainedModel):
        assert issubclass(family, clip_towers.CLIPFamilyPreTrainedModel)
    towers = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    text, vision = {**towers, "vocab_size": 50}, {**towers, "image_size": 16, "patch_size": 8}
    for name, model in (
        ("clip_moe", CLIPMoEModel(CLIPMoEConfig(text_config=text, vision_config=vision, num_local_experts=2))),
        ("we_moe", WEMoECLIPModel(WEMoEConfig(text_config=text, vision_config=vision, num_tasks=2))),
    ):
        model.save_pretrained(tmp_path / name)
        assert (tmp_path / name / "clip_towers.py").is_file(), name  # travels with the folder (remote code)
