"""Gradient checkpointing of MoIIE (Phi-3 and Llama decoders, with images): the decoder layers are recomputed in
the backward pass, and the loss, both balance losses and every gradient equal those without checkpointing;
`--gradient_checkpointing` trains through `hf-moe train-moiie`."""

import pytest
import test_moiie_llama
import test_moiie_training
import torch
from test_moiie_train_command import inputs, run, weights  # noqa: F401 (inputs is a fixture)

from hf_moe.modeling.modeling_moiie import MoIIESparseBlock


def phi3_model():
    processor = test_moiie_training.toy_processor()
    return test_moiie_training.toy_model(processor), processor.image_token_id


def llama_model():
    return test_moiie_llama.tiny_model(), test_moiie_llama.IMAGE_TOKEN


def image_batch(config, image_token_id):
    """Two rows holding 1 and 2 images (4 tokens each) and right padding; labels are the input ids."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, image_token_id, (2, 16), generator=generator)
    input_ids[0, 1:5] = image_token_id
    input_ids[1, 1:5] = image_token_id
    input_ids[1, 7:11] = image_token_id
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, -3:], attention_mask[0, -3:] = config.text_config.pad_token_id, 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    pixel_values = torch.randn(3, 3, 16, 16, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, "labels": labels}


def loss_and_gradients(build, checkpointing: bool):
    model, image_token_id = build()
    model.config.router_jitter_noise = 0.0
    for block in model.modules():
        if isinstance(block, MoIIESparseBlock):
            block.jitter_noise = 0.0
    assert model.config.text_config.attention_dropout == 0 and model.config.vision_config.attention_dropout == 0
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    calls = []
    hooks = [
        m.register_forward_pre_hook(lambda *_: calls.append(1))
        for m in model.modules()
        if isinstance(m, MoIIESparseBlock)
    ]
    out = model(**image_batch(model.config, image_token_id), output_router_logits=True)
    out.loss.backward()
    for hook in hooks:
        hook.remove()
    gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out, gradients, len(calls), len(hooks)


@pytest.mark.parametrize("build", [phi3_model, llama_model], ids=["phi3", "llama"])
def test_checkpointing_gives_the_same_losses_and_gradients(build):
    plain, plain_grads, plain_calls, moe_layers = loss_and_gradients(build, checkpointing=False)
    checkpointed, grads, calls, _ = loss_and_gradients(build, checkpointing=True)
    assert (
        plain_calls == moe_layers and calls == 2 * moe_layers
    )  # the MoE layers ran again in backward (a pre-hook: recomputation stops early, inside the block)
    for name in ("loss", "vision_aux_loss", "language_aux_loss"):
        assert getattr(plain, name) is not None and getattr(plain, name) > 0
        torch.testing.assert_close(getattr(checkpointed, name), getattr(plain, name), atol=1e-5, rtol=0, msg=name)
    assert grads.keys() == plain_grads.keys()
    assert any("router" in name for name in grads) and any("vision_tower" in name for name in grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=0, msg=name)


def test_train_moiie_with_gradient_checkpointing(inputs):  # noqa: F811
    assert run(inputs, "--stage", "finetune", "--gradient_checkpointing", "true", "--max_steps", "2") == 0
    before, after = weights(inputs / "model"), weights(inputs / "out")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(".mlp.experts." in name for name in changed) and any("_router." in name for name in changed)
    assert not any("vision_tower." in name for name in changed)
