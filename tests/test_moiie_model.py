"""MoIIE (SigLIP -> projector -> Phi-3 with intra-/inter-modality experts): equivalence with the dense model,
modality-respecting routing, several images per sample, padding-free balance losses, cached generation and
a fresh-process load without hf_moe."""

import copy
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe.modeling import MoIIEConfig, MoIIEPhi3ForCausalLM, load_balancing_loss

from conftest import experts_implementations
from helpers import run_without_hf_moe


IMAGE_TOKEN = 99
TOKENS_PER_IMAGE = 4  # 16 x 16 pixels in 8 x 8 patches


def tiny_config(**kwargs) -> MoIIEConfig:
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16)
    text = dict(model_type="phi3", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2)
    text.update(vocab_size=100, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return MoIIEConfig(
        vision_config={**vision, "patch_size": 8}, text_config=text, image_token_id=IMAGE_TOKEN, **kwargs
    )


def tiny_model(seed: int = 0, **kwargs) -> MoIIEPhi3ForCausalLM:
    torch.manual_seed(seed)
    return MoIIEPhi3ForCausalLM(tiny_config(**kwargs)).eval()


def batch(images_per_row=(1, 2), seq_len: int = 14, pad: int = 0, seed: int = 0):
    """Token ids with `images_per_row[i]` image blocks in row i; the last `pad` tokens of row 0 are padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 90, (len(images_per_row), seq_len), generator=generator)
    for row, count in enumerate(images_per_row):
        for image in range(count):
            start = 1 + image * (TOKENS_PER_IMAGE + 1)
            input_ids[row, start : start + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    attention_mask = torch.ones_like(input_ids)
    if pad:
        input_ids[0, -pad:] = 0
        attention_mask[0, -pad:] = 0
    pixel_values = torch.randn(sum(images_per_row), 3, 16, 16, generator=generator)
    pixel_values = pixel_values if sum(images_per_row) else None
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def copy_dense_into_experts(dense, moe):
    """Every expert (and the non-MoE MLPs) a copy of the dense MLP; routers stay random."""
    state = dense.state_dict()
    missing, _ = moe.load_state_dict(state, strict=False)
    with torch.no_grad():
        for index, layer in enumerate(moe.model.language_model.layers):
            if layer.is_moe:
                mlp = dense.model.language_model.layers[index].mlp
                layer.mlp.experts.gate_up_proj.copy_(mlp.gate_up_proj.weight.expand_as(layer.mlp.experts.gate_up_proj))
                layer.mlp.experts.down_proj.copy_(mlp.down_proj.weight.expand_as(layer.mlp.experts.down_proj))
    assert all("router" in key or "experts" in key for key in missing)


@pytest.mark.parametrize("implementation", experts_implementations())
@pytest.mark.parametrize("variant", ["moiie", "vanilla", "modality"])
def test_experts_copied_from_the_dense_mlp_give_the_dense_logits(variant, implementation):
    dense = tiny_model(variant="dense")
    moe = tiny_model(seed=1, variant=variant)
    copy_dense_into_experts(dense, moe)
    moe.set_experts_implementation(implementation)
    inputs = batch(pad=2)
    with torch.no_grad():
        expected = dense(**inputs).logits
        got = moe(**inputs, output_router_logits=True).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def expert_assignment(model, inputs):
    """Per MoE layer, the (token -> expert set) the experts received, by hooking the experts' forward."""
    seen = []
    for layer in model.model.language_model.layers:
        if layer.is_moe:
            layer.mlp.experts.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    with torch.no_grad():
        model(**inputs)
    return seen


def test_modalities_reach_only_their_experts_and_shared_ones():
    model = tiny_model(num_vision_experts=2, num_shared_experts=2, num_language_experts=2, num_experts_per_tok=2)
    inputs = batch(images_per_row=(2, 1))
    is_vision = (inputs["input_ids"] == IMAGE_TOKEN).reshape(-1)
    assignments = expert_assignment(model, inputs)
    assert len(assignments) == 2  # layers 1 and 3
    for index in assignments:
        assert (index[is_vision] < 4).all()  # vision [0, 1] + shared [2, 3]
        assert (index[~is_vision] >= 2).all()  # shared [2, 3] + language [4, 5]
    out = model(**inputs, output_router_logits=True)
    assert [tuple(r.shape) for r in out.router_logits] == [(28, 4)] * 4  # vision router, language router per layer


def test_modality_variant_sends_each_token_to_its_expert():
    model = tiny_model(variant="modality", num_vision_experts=1, num_shared_experts=2, num_language_experts=1)
    inputs = batch()
    is_vision = (inputs["input_ids"] == IMAGE_TOKEN).reshape(-1)
    for index in expert_assignment(model, inputs):
        assert index.shape[-1] == 1
        assert (index[is_vision] == 0).all() and (index[~is_vision] == 3).all()


def test_several_images_per_sample_text_only_batches_and_count_mismatch():
    model = tiny_model()
    inputs = batch(images_per_row=(2, 2))
    out = model(**inputs)
    assert out.image_hidden_states.shape == (4, TOKENS_PER_IMAGE, 32)
    text_only = batch(images_per_row=(0, 0))
    text_only["pixel_values"] = None
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    assert model(**text_only).logits.shape == (2, 14, 100) and not calls
    with pytest.raises(ValueError, match="do not match"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:3])


def test_image_tokens_without_pixel_values_run_as_llava_runs_them():
    """LLaVA runs image placeholders without pixel_values as the placeholder's embedding; MoIIE raised."""
    model = tiny_model()
    inputs = batch()
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert logits.shape == (2, 14, 100) and torch.isfinite(logits).all()


def test_inputs_embeds_with_pixel_values_give_the_input_ids_result():
    """LLaVA finds the placeholders in `inputs_embeds` by the image token's embedding; MoIIE found none and raised."""
    model = tiny_model()
    inputs = batch(pad=2)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        expected = model(**inputs, output_router_logits=True)
        got = model(
            inputs_embeds=embeds, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"],
            output_router_logits=True,
        )  # fmt: skip
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.vision_aux_loss, expected.vision_aux_loss)  # the modalities were found too


def test_image_features_and_outputs_are_llavas_output_classes():
    model = tiny_model()
    inputs = batch()
    features = model.get_image_features(inputs["pixel_values"], output_hidden_states=True)
    assert features.pooler_output.shape == (3, TOKENS_PER_IMAGE, 32)
    assert len(features.hidden_states) == 3  # embeddings + 2 layers
    assert isinstance(model.get_image_features(inputs["pixel_values"], return_dict=False), tuple)
    out = model(**inputs)
    torch.testing.assert_close(out.image_outputs.pooler_output, features.pooler_output)
    torch.testing.assert_close(out.image_hidden_states, features.pooler_output)


@pytest.mark.parametrize("implementation", experts_implementations())
def test_from_pretrained_takes_experts_and_flex_attention(tmp_path, implementation):
    """`experts_implementation` reached the SigLIP tower (which refused it); flex_attention was refused outright."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = MoIIEPhi3ForCausalLM.from_pretrained(tmp_path, experts_implementation=implementation)
    assert loaded.model.language_model.layers[1].mlp.experts.config._experts_implementation == implementation
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=0)
    flex = MoIIEPhi3ForCausalLM.from_pretrained(tmp_path, attn_implementation="flex_attention")
    assert flex.config.text_config._attn_implementation == "flex_attention"


def test_missing_weights_are_initialised_as_a_fresh_model_initialises_them(tmp_path):
    """A checkpoint without the SigLIP tower: its attention / MLP projections came back with the generic Linear init
    (transformers skips parameter-less blocks of code outside its package), not SigLIP's xavier init."""
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "vision_tower" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    loaded = MoIIEPhi3ForCausalLM.from_pretrained(tmp_path)
    tower = loaded.model.vision_tower  # SiglipVisionModel (transformers 5.25: no vision_model level)
    q_proj = getattr(tower, "vision_model", tower).encoder.layers[0].self_attn.q_proj
    bound = (6 / (q_proj.in_features + q_proj.out_features)) ** 0.5  # xavier_uniform's
    assert q_proj.weight.abs().max() <= bound and not q_proj.bias.any()
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)  # loaded weights kept


def test_auto_model_and_tp_plan():
    from transformers import AutoModel

    from hf_moe.modeling import MoIIEModel

    config = tiny_config()
    assert config.auto_map["AutoModel"] == "modeling_moiie.MoIIEModel"
    assert type(AutoModel.from_config(config)) is MoIIEModel
    plan = tiny_model().tp_plan
    assert plan["lm_head"] == "colwise_gather_output" and "model.language_model.embed_tokens" in plan


def test_padding_is_excluded_from_the_balance_losses():
    model = tiny_model()
    inputs = batch(pad=3)
    out = model(**inputs, labels=inputs["input_ids"], output_router_logits=True)
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][0, -3:] = 57  # other padding content: losses unchanged
    again = model(**changed, output_router_logits=True)
    torch.testing.assert_close(again.vision_aux_loss, out.vision_aux_loss)
    torch.testing.assert_close(again.language_aux_loss, out.language_aux_loss)
    lm = model(**inputs, labels=inputs["input_ids"]).loss
    expected = lm + 0.001 * (out.vision_aux_loss + out.language_aux_loss)
    torch.testing.assert_close(out.loss, expected)


def test_vanilla_balance_loss_is_one_loss_over_all_tokens_computed_by_hand():
    # One MoE layer, 4 experts, top-2; tokens: a vision token, a language token, a padding token.
    # Vision probs [.1, .2, .3, .4] choose experts 2, 3; language probs [.1, .4, .2, .3] choose 1, 3.
    # All tokens: f = [0, 1/2, 1/2, 1] (choices per token), P = mean probs = [.1, .3, .25, .35],
    # loss = 4 * (0 + .15 + .125 + .35) = 2.5. Per modality: vision 4 * (.3 + .4) = 2.8, language 4 * (.4 + .3) = 2.8.
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.4, 0.2, 0.3], [0.7, 0.1, 0.1, 0.1]])
    router_logits = (probs.log(),)
    token_type_ids, attention_mask = torch.tensor([[1, 0, 0]]), torch.tensor([[1, 1, 0]])
    official = tiny_model(variant="vanilla", moe_layers=[1])
    assert official.config.vanilla_balance_loss == "all_tokens"  # the default
    vision, language, total = official.balance_losses(router_logits, token_type_ids, attention_mask)
    assert vision is None and language is None
    torch.testing.assert_close(total, torch.tensor(2.5))
    pair = tiny_model(variant="vanilla", moe_layers=[1], vanilla_balance_loss="per_modality")
    vision, language, total = pair.balance_losses(router_logits, token_type_ids, attention_mask)
    torch.testing.assert_close((vision, language, total), (torch.tensor(2.8), torch.tensor(2.8), torch.tensor(5.6)))


@pytest.mark.parametrize("vanilla_balance_loss", ["all_tokens", "per_modality"])
def test_vanilla_loss_adds_its_aux_loss_once(vanilla_balance_loss):
    model = tiny_model(variant="vanilla", vanilla_balance_loss=vanilla_balance_loss)
    inputs = batch(pad=3)
    out = model(**inputs, labels=inputs["input_ids"], output_router_logits=True)
    lm = model(**inputs, labels=inputs["input_ids"]).loss
    torch.testing.assert_close(out.loss, lm + 0.001 * out.aux_loss)
    valid = inputs["attention_mask"].bool()
    if vanilla_balance_loss == "all_tokens":
        assert out.vision_aux_loss is None and out.language_aux_loss is None
        expected = load_balancing_loss(out.router_logits, 4, 2, valid.float())
    else:
        expected = out.vision_aux_loss + out.language_aux_loss
    torch.testing.assert_close(out.aux_loss, expected)
    moiie = tiny_model()(**inputs, output_router_logits=True)
    torch.testing.assert_close(moiie.aux_loss, moiie.vision_aux_loss + moiie.language_aux_loss)


@pytest.mark.parametrize("variant", ["moiie", "vanilla"])
def test_jitter_multiplies_the_layer_input_so_the_experts_see_it(variant):
    # Mixtral's form: hidden_states *= U(1 - j, 1 + j) before routing; the routers and the experts get the product.
    model = tiny_model(variant=variant, router_jitter_noise=0.3)
    block = model.model.language_model.layers[1].mlp
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 32, generator=generator)
    token_type_ids = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 0, 0]])
    seen = []
    block.experts.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    block.train()
    torch.manual_seed(7)
    with torch.no_grad():
        noised_out = block(hidden, token_type_ids)
    torch.manual_seed(7)
    noise = torch.empty(2, 5, 32).uniform_(0.7, 1.3)
    block.eval()  # no jitter: the block on the hand-noised input
    with torch.no_grad():
        expected = block(hidden * noise, token_type_ids)
    torch.testing.assert_close(seen[0], (hidden * noise).reshape(-1, 32), atol=0, rtol=0)  # the experts' input
    torch.testing.assert_close(noised_out, expected, atol=0, rtol=0)
    assert not torch.allclose(seen[0], hidden.reshape(-1, 32))


def test_generate_with_images_matches_uncached_greedy_decoding():
    model = tiny_model(seed=3)
    inputs = batch(images_per_row=(1, 2))
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    types = (ids == IMAGE_TOKEN).long()
    with torch.no_grad():
        for _ in range(4):
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=inputs["pixel_values"],
                token_type_ids=types,
                use_cache=False,
            ).logits
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], 1)
            mask = torch.cat([mask, torch.ones_like(next_token)], 1)
            types = torch.cat([types, torch.zeros_like(next_token)], 1)
    assert torch.equal(generated, ids)


def test_decode_steps_route_as_language_even_with_given_vision_token_type_ids():
    # generate() extends given token_type_ids by repeating the prompt's last value; a prompt that ends on an image
    # token would then mark every generated token as vision.
    model = tiny_model(seed=3)
    inputs = batch(images_per_row=(1, 1))
    with torch.no_grad():
        prefill = model(**inputs, token_type_ids=(inputs["input_ids"] == IMAGE_TOKEN).long(), use_cache=True)
        next_token = prefill.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_token)], 1)
        steps = {}
        for value in (0, 1):
            cache = copy.deepcopy(prefill.past_key_values)
            steps[value] = model(
                input_ids=next_token,
                attention_mask=mask,
                cache=cache,
                token_type_ids=torch.full_like(next_token, value),
                use_cache=True,
            ).logits
    assert torch.equal(steps[0], steps[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_experts_per_tok": 4}, "top-k"),
        ({"variant": "sparse"}, "variant"),
        ({"moe_layers": [7]}, "moe_layers"),
        ({"variant": "modality", "num_language_experts": 0}, "modality"),
        ({"variant": "vanilla", "num_experts_per_tok": 5}, "top-k"),
        ({"projector_type": "linear"}, "projector_type"),
        ({"variant": "vanilla", "vanilla_balance_loss": "per_router"}, "vanilla_balance_loss"),
    ],
)
def test_bad_config_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


FRESH = textwrap.dedent(
    """
    import re
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer
    folder, workdir = sys.argv[1], sys.argv[2]
    inputs = torch.load(f"{workdir}/inputs.pt")
    valid = inputs["attention_mask"].bool()

    def load(**kwargs):
        return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()

    model = load()
    with torch.no_grad():
        out = model(**inputs, output_router_logits=True)
    torch.save({"logits": out.logits, "aux": out.vision_aux_loss, "module": type(model).__module__},
               f"{workdir}/out.pt")

    def same_logits(model, atol=1e-5):
        with torch.no_grad():
            got = model(**inputs).logits
        torch.testing.assert_close(got[valid].float(), out.logits[valid], atol=atol, rtol=0)

    # The arguments a user passes to from_pretrained, each on its own.
    for attn in ("eager", "sdpa"):
        same_logits(load(attn_implementation=attn))
    for experts in ("eager", "batched_mm", "grouped_mm"):  # the CPU ones of transformers' experts implementations
        loaded = load(experts_implementation=experts)
        assert loaded.config.text_config._experts_implementation == experts
        same_logits(loaded)
    bf16 = load(dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    same_logits(bf16, atol=0.05)
    same_logits(load(device_map="auto"))
    same_logits(torch.compile(load()))
    # ONNX (dynamo) through the default experts implementation, run by onnxruntime (both come with the test extra).
    program = torch.onnx.export(load(), (), kwargs=dict(inputs, use_cache=False), dynamo=True)
    onnx_logits = program(**inputs, use_cache=False)[0]
    torch.testing.assert_close(onnx_logits[valid], out.logits[valid], atol=1e-4, rtol=0)
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(base).__name__ == "MoIIEModel", type(base)

    # tp_plan: the head is sharded with the embedding (as Phi-3's plan does), every entry names existing modules.
    plan, names = load().tp_plan, [name for name, _ in model.named_modules()]
    assert plan.get("lm_head") == "colwise_gather_output" and "model.language_model.embed_tokens" in plan, plan
    for pattern in plan:
        regex = re.compile(pattern.replace(".", "[.]").replace("*", "[0-9]+") + "$")
        assert any(regex.match(name) for name in names), pattern

    # Gradient checkpointing: the same loss, and every decoder parameter gets a gradient.
    trained = load().train()
    loss = trained(**inputs, labels=inputs["input_ids"]).loss
    trained.gradient_checkpointing_enable()
    checkpointed = trained(**inputs, labels=inputs["input_ids"]).loss
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, loss)
    decoder = trained.model.language_model
    assert all(p.grad is not None for name, p in decoder.named_parameters() if "router" not in name)

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1))

        def end(self):
            self.ended = True

    streamer = Collect()
    one = {key: value[1:] for key, value in inputs.items() if key != "pixel_values"}
    one["pixel_values"] = inputs["pixel_values"][1:]  # row 1 holds the second row's images
    generated = model.generate(**one, streamer=streamer, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert streamer.ended and torch.equal(torch.cat(streamer.chunks[1:]), generated[0, one["input_ids"].shape[1]:])
    assert not any(name.startswith("hf_moe") for name in sys.modules)
    """
)


def test_saved_folder_loads_in_a_fresh_process_without_hf_moe(tmp_path):
    """Deliverable of issue 15: every `from_pretrained` argument a user passes works where hf_moe is absent (dtype,
    device_map, attn / experts implementation, torch.compile, gradient checkpointing, the tp plan, `AutoModel`,
    `generate` with a streamer, ONNX export). A 1-process tensor-parallel run needs a distributed launch: the plan is
    checked."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "moiie")
    files = {path.name for path in (tmp_path / "moiie").iterdir()}
    assert {"configuration_moiie.py", "modeling_moiie.py", "moe.py"} <= files
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "moiie")) is MoIIEPhi3ForCausalLM
    inputs = batch(images_per_row=(1, 1), pad=2)
    torch.save(inputs, tmp_path / "inputs.pt")
    run_without_hf_moe(FRESH, [tmp_path / "moiie", tmp_path], tmp_path)
    remote = torch.load(tmp_path / "out.pt")
    assert remote["module"].startswith("transformers_modules")
    with torch.no_grad():
        local = model(**inputs, output_router_logits=True)
    torch.testing.assert_close(remote["logits"], local.logits, atol=0, rtol=0)
    torch.testing.assert_close(remote["aux"], local.vision_aux_loss, atol=0, rtol=0)


def test_text_only_batch_trains_when_only_the_projector_trains():
    """Stage 1 trains only the projector: a text-only batch still backpropagates (zero projector gradient, the loss
    unchanged) instead of failing with "element 0 of tensors does not require grad"."""
    model = tiny_model(seed=3).train()
    text_only = batch(images_per_row=(0, 0))
    text_only["labels"] = text_only["input_ids"]
    with torch.no_grad():
        expected = model(**text_only).loss
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("model.multi_modal_projector."))
    loss = model(**text_only).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=0)
    for param in model.model.multi_modal_projector.parameters():
        assert param.grad is not None and not param.grad.any()


def test_text_only_training_batch_in_a_process_group_runs_the_vision_side_with_weight_zero(tmp_path):
    """Distributed training: a process whose batch holds no image still runs the vision tower and projector (its
    ZeRO / DDP collectives must match the other processes'), without changing its loss; their gradients are zero."""
    model = tiny_model(seed=3).train()
    text_only = batch(images_per_row=(0, 0))
    text_only["labels"] = text_only["input_ids"]
    alone = model(**text_only).loss
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loss = model(**text_only).loss
        loss.backward()
    finally:
        torch.distributed.destroy_process_group()
    assert calls == [1]
    torch.testing.assert_close(loss, alone, rtol=0, atol=0)
    for param in model.model.multi_modal_projector.parameters():
        assert param.grad is not None and not param.grad.any()
