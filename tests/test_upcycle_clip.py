"""upcycle_clip and its command: multiplet upcycling, option spellings, bad input refused with nothing written."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import CLIPModel

from hf_moe.cli import main
from hf_moe.conversion import upcycle_clip
from hf_moe.modeling import CLIPMoEModel

from helpers import clip_inputs


def save_variant(base_dir, output_dir, seed, prefix=".mlp."):
    """A copy of the base whose parameters containing `prefix` are perturbed (an MCL stage checkpoint)."""
    model = CLIPModel.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if prefix in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model.save_pretrained(output_dir)
    for processor_file in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_dir / processor_file, output_dir / processor_file)
    return output_dir


class MeanOfMLPs(torch.nn.Module):
    def __init__(self, mlps):
        super().__init__()
        self.mlps = torch.nn.ModuleList(mlps)

    def forward(self, hidden):
        return sum(mlp(hidden) for mlp in self.mlps) / len(self.mlps)


@pytest.fixture(scope="module")
def stage_dirs(toy_clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    return [toy_clip_dir] + [save_variant(toy_clip_dir, root / f"stage{i}", seed=i) for i in (1, 2)]


def test_multiplet_experts_are_the_bases_mlps(stage_dirs, tmp_path):
    model = upcycle_clip(stage_dirs, tmp_path / "moe", top_k=2)
    assert model.config.num_local_experts == 3
    for i, stage in enumerate(stage_dirs):
        dense = CLIPModel.from_pretrained(stage)
        for tower in ("text_model", "vision_model"):
            dense_mlp = getattr(dense, tower).encoder.layers[1].mlp
            experts = getattr(model, tower).encoder.layers[1].mlp.experts
            torch.testing.assert_close(experts.up_proj[i], dense_mlp.fc1.weight)
            torch.testing.assert_close(experts.down_proj_bias[i], dense_mlp.fc2.bias)


def test_multiplet_model_routes_through_each_bases_mlp(stage_dirs, tmp_path):
    """With all experts active and a zero router, every MoE MLP is the mean of the bases' MLPs."""
    model = upcycle_clip(stage_dirs, tmp_path / "moe", top_k=3).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("router.weight"):
                parameter.zero_()
    bases = [CLIPModel.from_pretrained(stage).eval() for stage in stage_dirs]
    reference = CLIPModel.from_pretrained(stage_dirs[0]).eval()
    for tower in ("text_model", "vision_model"):
        for layer_idx, layer in enumerate(getattr(reference, tower).encoder.layers):
            layer.mlp = MeanOfMLPs([getattr(base, tower).encoder.layers[layer_idx].mlp for base in bases])
    inputs = clip_inputs(model.config)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits_per_image, reference(**inputs).logits_per_image)
        # ...and it is not simply the first base's function.
        assert not torch.allclose(
            model(**inputs).logits_per_image, CLIPModel.from_pretrained(stage_dirs[0])(**inputs).logits_per_image
        )


def test_top_k_routing_block_matches_a_reference_over_the_bases(stage_dirs, tmp_path):
    model = upcycle_clip(stage_dirs, tmp_path / "moe", top_k=2, seed=3).eval()
    bases = [CLIPModel.from_pretrained(stage).eval() for stage in stage_dirs]
    block = model.vision_model.encoder.layers[0].mlp
    hidden = torch.randn(10, 32)
    probs = F.linear(hidden, block.router.weight).softmax(-1)
    weights, chosen = probs.topk(2)
    weights = weights / weights.sum(-1, keepdim=True)
    expected = torch.stack(
        [
            sum(w * bases[e].vision_model.encoder.layers[0].mlp(token) for w, e in zip(ws, es))
            for token, ws, es in zip(hidden, weights, chosen.tolist())
        ]
    )
    with torch.no_grad():
        torch.testing.assert_close(block(hidden[None])[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spelling", ["underscore", "dash"])
def test_command_accepts_both_option_spellings(toy_clip_dir, tmp_path, spelling):
    flags = ["--num_experts", "2", "--top_k", "1", "--output_dir", str(tmp_path / "out"), "--expert_dropout", "0.1"]
    if spelling == "dash":
        flags = [flag.replace("_", "-") if flag.startswith("--") else flag for flag in flags]
    assert main(["upcycle-clip", str(toy_clip_dir), *flags]) == 0
    model = CLIPMoEModel.from_pretrained(tmp_path / "out")
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (2, 1)
    assert model.config.vision_config.expert_dropout == 0.1
    assert load_file(tmp_path / "out" / "model.safetensors")  # safetensors, not pickles


def test_command_takes_several_bases(stage_dirs, tmp_path):
    assert main(["upcycle-clip", *map(str, stage_dirs), "--output-dir", str(tmp_path / "out")]) == 0
    assert CLIPMoEModel.from_pretrained(tmp_path / "out").config.num_local_experts == 3


def corrupt_copy(base_dir, output_dir):
    shutil.copytree(base_dir, output_dir)
    (output_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    return output_dir


@pytest.mark.parametrize(
    "case, match",
    [
        ("top_k_above_experts", "top_k must be between 1 and num_experts=2"),
        ("zero_experts", "num_experts must be at least 1"),
        ("shared_weights_differ", r"text_model\.encoder\.layers\.0\.self_attn\.q_proj\.weight differs"),
        ("missing_base", "does not exist"),
        ("corrupt_base", "corrupt"),
        ("wrong_expert_count", "num_experts=5 but 2 bases"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(toy_clip_dir, tmp_path, case, match):
    output = tmp_path / "out"
    bases, kwargs = [toy_clip_dir], {"num_experts": 2, "top_k": 1}
    if case == "top_k_above_experts":
        kwargs["top_k"] = 3
    elif case == "zero_experts":
        kwargs["num_experts"] = 0
    elif case == "shared_weights_differ":
        bases, kwargs = [toy_clip_dir, save_variant(toy_clip_dir, tmp_path / "attn", seed=1, prefix="q_proj")], {}
    elif case == "missing_base":
        bases = [tmp_path / "no-such-checkpoint"]
    elif case == "corrupt_base":
        bases = [corrupt_copy(toy_clip_dir, tmp_path / "corrupt")]
    elif case == "wrong_expert_count":
        bases, kwargs = [toy_clip_dir, toy_clip_dir], {"num_experts": 5}
    with pytest.raises((ValueError, OSError), match=match):
        upcycle_clip(bases, output, **kwargs)
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_command_reports_bad_input_without_traceback(toy_clip_dir, tmp_path, capsys):
    code = main(
        ["upcycle-clip", str(toy_clip_dir), "--num_experts", "2", "--top_k", "3", "--output_dir", str(tmp_path / "o")]
    )
    assert code == 1
    assert "top_k must be between 1 and num_experts=2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_folder_is_not_overwritten(toy_clip_dir, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        upcycle_clip(toy_clip_dir, output, num_experts=2)
    assert (output / "keep.txt").read_text() == "user data"


def test_clip_moe_base_is_refused(upcycled_dir, tmp_path, capsys):
    # A CLIP-MoE's config is a CLIPConfig too: loaded as a CLIPModel it has fresh random MLPs.
    output = tmp_path / "o"
    assert main(["upcycle-clip", str(upcycled_dir), "--num_experts", "2", "--output_dir", str(output)]) == 1
    err = capsys.readouterr().err
    assert "is already a CLIP-MoE ('clip_moe'); this step needs a DENSE CLIP" in err and "Traceback" not in err
    assert not output.exists()


@pytest.mark.parametrize("layout", ["output_is_base", "base_inside_output"])
def test_overwrite_never_deletes_a_base(toy_clip_dir, tmp_path, capsys, layout):
    output = tmp_path / "out"
    base = output if layout == "output_is_base" else output / "base"
    shutil.copytree(toy_clip_dir, base)
    before = {path.name: path.stat().st_mtime_ns for path in base.iterdir()}
    argv = ["upcycle-clip", str(base), "--num_experts", "2", "--output_dir", str(output), "--overwrite"]
    assert main(argv) == 1
    assert "would destroy that input" in capsys.readouterr().err
    assert {path.name: path.stat().st_mtime_ns for path in base.iterdir()} == before


def test_truncated_and_missing_bases_are_named(toy_clip_dir, tmp_path, capsys, monkeypatch):
    truncated = tmp_path / "truncated"
    shutil.copytree(toy_clip_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    output = tmp_path / "o"
    assert main(["upcycle-clip", str(truncated), "--num_experts", "2", "--output_dir", str(output)]) == 1
    err = capsys.readouterr().err
    assert f"Model weights file '{weights}' is truncated" in err and "Traceback" not in err

    # A relative path with several parts cannot be a Hub id: say the folder is missing, without trying the Hub.
    monkeypatch.chdir(tmp_path)
    assert main(["upcycle-clip", "runs/mcl/stage0", "--num_experts", "2", "--output_dir", "o"]) == 1
    assert "model folder 'runs/mcl/stage0' does not exist" in capsys.readouterr().err
    assert not output.exists()
