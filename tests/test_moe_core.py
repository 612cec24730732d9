"""The shared MoE core: router, packed experts under every experts implementation, balance and z losses."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from hf_moe.modeling import MoESparseBlock, MoETopKRouter, expert_load, load_balancing_loss, router_z_loss

from conftest import experts_implementations


def moe_config(**overrides):
    fields = dict(
        hidden_size=16,
        intermediate_size=32,
        hidden_act="quick_gelu",
        num_local_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        router_jitter_noise=0.0,
        expert_dropout=0.0,
        _experts_implementation="eager",
    )
    return SimpleNamespace(**{**fields, **overrides})


def random_block(seed=0, **overrides):
    torch.manual_seed(seed)
    block = MoESparseBlock(moe_config(**overrides))
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    return block.eval()


def loop_reference(block, hidden):
    """Token by token: softmax over all experts, top-k, renormalise, weighted sum of MLP outputs."""
    experts, outputs = block.experts, []
    for token in hidden.reshape(-1, hidden.shape[-1]).double():
        probs = F.linear(token, block.router.weight.double()).softmax(-1)
        weights, chosen = probs.topk(block.router.top_k)
        if block.router.norm_topk_prob:
            weights = weights / weights.sum()
        out = 0
        for weight, e in zip(weights, chosen):
            h = F.linear(token, experts.up_proj[e].double(), experts.up_proj_bias[e].double())
            h = h * torch.sigmoid(1.702 * h)  # quick_gelu
            out = out + weight * F.linear(h, experts.down_proj[e].double(), experts.down_proj_bias[e].double())
        outputs.append(out)
    return torch.stack(outputs).reshape(hidden.shape)


@pytest.mark.parametrize("implementation", experts_implementations())
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_experts_implementations_match_a_loop(implementation, norm_topk_prob):
    block = random_block(norm_topk_prob=norm_topk_prob, _experts_implementation=implementation)
    hidden = torch.randn(2, 5, 16)
    out = block(hidden)
    torch.testing.assert_close(out.double(), loop_reference(block, hidden), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", experts_implementations())
def test_experts_implementations_have_equal_gradients(implementation):
    hidden = torch.randn(2, 5, 16)
    grads = {}
    for impl in ("eager", implementation):
        block = random_block(_experts_implementation=impl).train()
        block(hidden).square().sum().backward()
        grads[impl] = {name: p.grad.clone() for name, p in block.named_parameters()}
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads[implementation][name], grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("implementation", experts_implementations())
def test_experts_implementations_take_widths_grouped_mm_kernels_refuse(implementation):
    # 37 fp32 values a row are not 16-byte aligned: torch's grouped_mm raises "strides should be multiple of 16 bytes"
    # (transformers' Mixtral too); the default implementation must still run, as batched_mm.
    block = random_block(intermediate_size=37, _experts_implementation=implementation)
    hidden = torch.randn(2, 5, 16)
    torch.testing.assert_close(block(hidden).double(), loop_reference(block, hidden), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", experts_implementations())
def test_experts_export_under_every_implementation(implementation):
    # torch.export (and ONNX's dynamo exporter, which runs it) cannot trace eager's data-dependent loop over the
    # experts hit nor lower grouped_mm: the exported program computes batched_mm's, the same values.
    block = random_block(_experts_implementation=implementation)
    hidden = torch.randn(2, 5, 16)
    program = torch.export.export(block, (hidden,), strict=False)
    torch.testing.assert_close(program.module()(hidden).double(), loop_reference(block, hidden), atol=1e-5, rtol=1e-5)


def test_router_is_fp32_and_renormalises():
    router = MoETopKRouter(moe_config()).to(torch.bfloat16)
    torch.nn.init.normal_(router.weight)
    logits, scores, indices = router(torch.randn(7, 16, dtype=torch.bfloat16))
    assert logits.dtype == scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(-1), torch.ones(7))
    expected = logits.softmax(-1).topk(2).indices
    assert torch.equal(indices, expected)


def test_jitter_and_expert_dropout_act_in_training_only():
    hidden = torch.randn(2, 5, 16)
    plain = random_block()
    noisy = random_block(router_jitter_noise=0.5, expert_dropout=0.5)
    torch.testing.assert_close(noisy(hidden), plain(hidden))  # eval: identical functions
    noisy.train()
    torch.manual_seed(1)
    assert not torch.allclose(noisy(hidden), plain(hidden))


def random_router_logits(num_layers=3, batch=4, seq=7, experts=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch * seq, experts, generator=generator) * 2 for _ in range(num_layers))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_balance_loss_equals_transformers_mixtral(top_k):
    logits = random_router_logits()
    ours = load_balancing_loss(logits, num_experts=4, top_k=top_k)
    reference = load_balancing_loss_func(logits, num_experts=4, top_k=top_k)
    torch.testing.assert_close(ours, reference)


def test_balance_loss_with_padding_equals_transformers_mixtral():
    logits = random_router_logits()
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 5:] = 0
    ours = load_balancing_loss(logits, num_experts=4, top_k=2, attention_mask=mask)
    reference = load_balancing_loss_func(logits, num_experts=4, top_k=2, attention_mask=mask)
    torch.testing.assert_close(ours, reference)
    # Padding must matter: the unmasked loss differs.
    assert not torch.allclose(ours, load_balancing_loss(logits, num_experts=4, top_k=2))


def test_balance_loss_is_k_when_perfectly_balanced():
    # Every expert equally likely and chosen equally often: loss = E * sum_e (k/E) * (1/E) = k.
    logits = (torch.eye(4).repeat(5, 1) * 10,)
    assert load_balancing_loss(logits, num_experts=4, top_k=1).item() == pytest.approx(1.0, abs=1e-3)


def test_router_z_loss_matches_its_definition_with_padding():
    logits = random_router_logits(num_layers=2)
    mask = torch.ones(4, 7)
    mask[1, 4:] = 0
    flat_mask = mask.reshape(-1).repeat(2).bool()
    expected = (torch.cat(logits).logsumexp(-1) ** 2)[flat_mask].mean()
    torch.testing.assert_close(router_z_loss(logits, mask), expected)


def test_expert_load_fractions():
    logits = (torch.tensor([[5.0, 0, 0, 0], [5.0, 0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 5.0]]),)
    torch.testing.assert_close(expert_load(logits, top_k=1), torch.tensor([[0.5, 0.0, 0.25, 0.25]]))
