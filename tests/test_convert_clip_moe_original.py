"""The converter of the official CLIP-MoE release files, tested on state dicts the test writes in that naming."""

import pytest
import torch
from transformers import CLIPModel

from hf_moe.cli import main
from hf_moe.conversion import convert_clip_moe_original

from helpers import clip_inputs


def openai_naming(dense: CLIPModel, num_experts: int, moe_layers: int, expert_noise: float, long_text: bool, seed=0):
    """Write `dense` as the official release stores a CLIP-MoE: OpenAI-CLIP keys, the last `moe_layers` blocks
    of each tower with `experts.{e}.c_fc/c_proj` (the dense MLP plus `expert_noise`) and a `gate`."""
    generator = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in dense.state_dict().items()}
    out = {
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t(),
        "logit_scale": sd["logit_scale"],
    }
    positions = sd["text_model.embeddings.position_embedding.weight"]
    if long_text:
        # Long-CLIP: the frozen copy is used for positions < 20 and the trained copy for the rest.
        positions = torch.randn(248, positions.shape[1], generator=generator)
        out["positional_embedding_res"] = torch.randn(248, positions.shape[1], generator=generator)
    out["positional_embedding"] = positions
    for hf_tower, oa_tower, config in [
        ("vision_model", "visual.transformer", dense.config.vision_config),
        ("text_model", "transformer", dense.config.text_config),
    ]:
        for i in range(config.num_hidden_layers):
            hf, oa = f"{hf_tower}.encoder.layers.{i}", f"{oa_tower}.resblocks.{i}"
            for kind in ("weight", "bias"):
                out[f"{oa}.attn.in_proj_{kind}"] = torch.cat([sd[f"{hf}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
                out[f"{oa}.attn.out_proj.{kind}"] = sd[f"{hf}.self_attn.out_proj.{kind}"]
                out[f"{oa}.ln_1.{kind}"] = sd[f"{hf}.layer_norm1.{kind}"]
                out[f"{oa}.ln_2.{kind}"] = sd[f"{hf}.layer_norm2.{kind}"]
                for oa_fc, hf_fc in (("c_fc", "fc1"), ("c_proj", "fc2")):
                    dense_param = sd[f"{hf}.mlp.{hf_fc}.{kind}"]
                    if i < config.num_hidden_layers - moe_layers:
                        out[f"{oa}.mlp.{oa_fc}.{kind}"] = dense_param
                        continue
                    for e in range(num_experts):
                        noise = torch.randn(dense_param.shape, generator=generator) * expert_noise
                        out[f"{oa}.experts.{e}.{oa_fc}.{kind}"] = dense_param + noise
            if i >= config.num_hidden_layers - moe_layers:
                out[f"{oa}.gate.weight"] = torch.randn(num_experts, config.hidden_size, generator=generator) * 0.02
    return out


def test_converted_release_with_identical_experts_is_the_dense_clip(toy_clip_dir, tmp_path):
    dense = CLIPModel.from_pretrained(toy_clip_dir).eval()
    torch.save(openai_naming(dense, num_experts=4, moe_layers=2, expert_noise=0.0, long_text=False), tmp_path / "r.pt")
    model = convert_clip_moe_original(tmp_path / "r.pt", toy_clip_dir, tmp_path / "out").eval()
    inputs = clip_inputs(dense.config, pad=2)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**inputs).logits_per_image, dense(**inputs).logits_per_image, atol=1e-5, rtol=0
        )


def test_converted_release_keeps_experts_gates_dense_blocks_and_long_positions(toy_clip_dir, tmp_path):
    dense = CLIPModel.from_pretrained(toy_clip_dir).eval()
    original = openai_naming(dense, num_experts=3, moe_layers=1, expert_noise=0.1, long_text=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in original.items()}}, tmp_path / "r.pt")
    assert (
        main(
            [
                "convert-clip-moe-original",
                str(tmp_path / "r.pt"),
                "--base",
                str(toy_clip_dir),
                "--output-dir",
                str(tmp_path / "out"),
                "--top-k",
                "2",
            ]
        )
        == 0
    )
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tmp_path / "out")
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (3, 2)
    assert model.config.vision_config.moe_layer_indices() == [1]  # the last block only
    assert model.config.long_text and model.config.text_config.max_position_embeddings == 248
    positions = model.text_model.embeddings.position_embedding.weight
    torch.testing.assert_close(positions[:20], original["positional_embedding"][:20])
    torch.testing.assert_close(positions[20:], original["positional_embedding_res"][20:])
    layer = model.vision_model.encoder.layers[1].mlp
    for e in range(3):
        torch.testing.assert_close(
            layer.experts.up_proj[e], original[f"visual.transformer.resblocks.1.experts.{e}.c_fc.weight"]
        )
        torch.testing.assert_close(
            layer.experts.down_proj_bias[e], original[f"visual.transformer.resblocks.1.experts.{e}.c_proj.bias"]
        )
    torch.testing.assert_close(layer.router.weight, original["visual.transformer.resblocks.1.gate.weight"])
    torch.testing.assert_close(
        model.text_model.encoder.layers[0].mlp.fc1.weight, original["transformer.resblocks.0.mlp.c_fc.weight"]
    )


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "does not exist"),
        ("corrupt", "Could not read"),
        ("not_moe", "not a CLIP-MoE checkpoint"),
        ("wrong_base", "does not fit the architecture"),
    ],
)
def test_bad_release_files_are_refused_and_nothing_is_written(toy_clip_dir, tmp_path, case, match):
    from hf_moe.toy import save_toy_clip

    dense = CLIPModel.from_pretrained(toy_clip_dir)
    checkpoint, base = tmp_path / "r.pt", toy_clip_dir
    if case == "corrupt":
        checkpoint.write_bytes(b"\x80\x04garbage")
    elif case == "not_moe":
        torch.save(openai_naming(dense, num_experts=2, moe_layers=0, expert_noise=0.0, long_text=False), checkpoint)
    elif case == "wrong_base":
        torch.save(openai_naming(dense, num_experts=2, moe_layers=1, expert_noise=0.0, long_text=False), checkpoint)
        base = save_toy_clip(tmp_path / "wider", hidden_size=64)
    with pytest.raises((ValueError, OSError), match=match):
        convert_clip_moe_original(checkpoint, base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_top_k_above_the_release_experts_is_one_clear_line(toy_clip_dir, tmp_path, capsys):
    dense = CLIPModel.from_pretrained(toy_clip_dir)
    torch.save(openai_naming(dense, num_experts=2, moe_layers=1, expert_noise=0.0, long_text=False), tmp_path / "r.pt")
    argv = ["convert-clip-moe-original", str(tmp_path / "r.pt"), "--base", str(toy_clip_dir)]
    assert main([*argv, "--output_dir", str(tmp_path / "out"), "--top_k", "5"]) == 1
    err = capsys.readouterr().err
    expected = f"--top_k 5 is more than the 2 experts of {tmp_path / 'r.pt'}."
    assert err.strip().splitlines()[-1] == f"hf-moe convert-clip-moe-original: error: {expected}"
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_output_folder_holding_the_release_file_is_not_overwritten(toy_clip_dir, tmp_path):
    dense = CLIPModel.from_pretrained(toy_clip_dir)
    torch.save(openai_naming(dense, num_experts=2, moe_layers=1, expert_noise=0.0, long_text=False), tmp_path / "r.pt")
    with pytest.raises(ValueError, match="would destroy that input"):
        convert_clip_moe_original(tmp_path / "r.pt", toy_clip_dir, tmp_path, overwrite=True)
    assert (tmp_path / "r.pt").is_file()
