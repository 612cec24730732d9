"""merge_wemoe and the merge-wemoe / wemoe-params commands: a constant depth-0 router gives the task-arithmetic
model, the WEMoE blocks hold the pretrained MLP and the task vectors, bad input is refused with nothing written."""

import pytest
import torch
from huggingface_hub import ModelCard
from test_merging import save_vision_finetune, vision_state
from transformers import AutoModel, CLIPModel

from hf_moe.cli import main
from hf_moe.conversion import merge_wemoe
from hf_moe.merging import merge_clip_vision
from hf_moe.toy import save_toy_clip


@pytest.fixture(scope="module")
def task_dirs(toy_clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("wemoe-tasks")
    return [save_vision_finetune(toy_clip_dir, root / f"task{i}", seed=20 + i) for i in range(3)]


def image_features(model, pixel_values):
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values)
    return getattr(features, "pooler_output", features)


def test_depth0_router_model_is_the_task_arithmetic_model(toy_clip_dir, task_dirs, tmp_path):
    merge_wemoe(toy_clip_dir, task_dirs, tmp_path / "wemoe", router_depth=0, init_lambda=0.4)
    merge_clip_vision("task_arithmetic", toy_clip_dir, task_dirs, tmp_path / "ta", scaling=0.4)
    wemoe = AutoModel.from_pretrained(tmp_path / "wemoe").eval()
    assert type(wemoe).__name__ == "WEMoECLIPModel"
    dense = CLIPModel.from_pretrained(tmp_path / "ta").eval()
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(image_features(wemoe, pixel_values), image_features(dense, pixel_values))
    # The text tower is the pretrained one.
    pretrained = CLIPModel.from_pretrained(toy_clip_dir)
    for key, tensor in pretrained.text_model.state_dict().items():
        assert torch.equal(wemoe.text_model.state_dict()[key], tensor)


def test_wemoe_blocks_hold_the_pretrained_mlp_and_the_task_vectors(toy_clip_dir, task_dirs, tmp_path):
    model = merge_wemoe(toy_clip_dir, task_dirs, tmp_path / "wemoe", task_names=["a", "b", "c"])
    base, tasks = vision_state(toy_clip_dir), [vision_state(d) for d in task_dirs]
    mlp = model.vision_model.encoder.layers[1].mlp
    torch.testing.assert_close(mlp.fc1.weight, base["encoder.layers.1.mlp.fc1.weight"])
    expected = torch.stack([t["encoder.layers.1.mlp.fc2.bias"] - base["encoder.layers.1.mlp.fc2.bias"] for t in tasks])
    torch.testing.assert_close(mlp.task_vectors.stacked("fc2.bias"), expected)
    assert model.config.vision_config.task_names == ["a", "b", "c"]
    assert model.config.vision_config.router_depth == 2

    card = ModelCard.load(tmp_path / "wemoe" / "README.md")
    assert "we-moe" in card.data.tags and card.data.pipeline_tag == "zero-shot-image-classification"
    assert "task arithmetic (lambda = 0.3)" in card.text and "depth-2 routers (one router per block)" in card.text
    assert f"0. `a`: `{task_dirs[0]}`" in card.text
    assert f"hf-moe merge-wemoe {toy_clip_dir} {task_dirs[0]}" in card.text and "--task_names a b c" in card.text
    assert (tmp_path / "wemoe" / "processor_config.json").is_file()


def test_vision_only_pretrained_gives_a_wemoe_vision_model(toy_clip_dir, task_dirs, tmp_path):
    pretrained = save_vision_finetune(toy_clip_dir, tmp_path / "vision-base", seed=None)
    merge_wemoe(pretrained, task_dirs[:2], tmp_path / "wemoe", router_depth=1, shared_router=True)
    model = AutoModel.from_pretrained(tmp_path / "wemoe")
    assert type(model).__name__ == "WEMoECLIPVisionModel" and model.config.shared_router
    assert ModelCard.load(tmp_path / "wemoe" / "README.md").data.pipeline_tag == "image-feature-extraction"


@pytest.mark.parametrize(
    "case, match",
    [
        ("architecture", r"vision_config.intermediate_size is 64 in '.*narrow' but 128"),
        ("both", "prune_ratio or svd_rank_fraction, not both"),
        ("names", "task_names has 2 names but num_tasks=3"),
        ("depth", "router_depth must be 0, 1 or 2"),
        ("none", "at least one FINETUNED"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(toy_clip_dir, task_dirs, tmp_path, case, match):
    finetuned, kwargs = list(task_dirs), {}
    if case == "architecture":
        narrow = save_toy_clip(tmp_path / "narrow-src")
        config = CLIPModel.from_pretrained(narrow).config
        config.vision_config.intermediate_size = 64
        CLIPModel(config).save_pretrained(tmp_path / "narrow")
        finetuned[1] = tmp_path / "narrow"
    elif case == "both":
        kwargs = {"prune_ratio": 0.9, "svd_rank_fraction": 0.5}
    elif case == "names":
        kwargs = {"task_names": ["a", "b"]}
    elif case == "depth":
        kwargs = {"router_depth": 3}
    else:
        finetuned = []
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        merge_wemoe(toy_clip_dir, finetuned, output, **kwargs)
    assert not output.exists() and not list(tmp_path.glob(".out*"))


def test_commands_merge_wemoe_and_wemoe_params(toy_clip_dir, task_dirs, tmp_path, capsys):
    dense_dir, pruned_dir = tmp_path / "dense", tmp_path / "pruned"
    common = [str(toy_clip_dir), *map(str, task_dirs)]
    assert main(["merge-wemoe", *common, "--output_dir", str(dense_dir), "--task_names", "x", "y", "z"]) == 0
    assert (
        main(["merge-wemoe", *common, "--output_dir", str(pruned_dir), "--shared_router", "--prune_ratio", "0.9"]) == 0
    )
    assert str(pruned_dir) in capsys.readouterr().out
    assert AutoModel.from_pretrained(dense_dir).config.vision_config.task_names == ["x", "y", "z"]

    def counts(folder):
        assert main(["wemoe-params", str(folder)]) == 0
        out = capsys.readouterr().out
        return out, {
            label: int(re_value.replace(",", ""))
            for label, re_value in ((line[:24].strip(), line[24:38].strip()) for line in out.splitlines()[2:])
        }

    dense_out, dense = counts(dense_dir)
    pruned_out, pruned = counts(pruned_dir)
    assert "3 tasks, depth-2 routers (a router per block), dense task vectors" in dense_out
    assert "routers (one shared router (E-WEMoE)), pruned 90% task vectors" in pruned_out
    model = AutoModel.from_pretrained(dense_dir)
    routers = sum(p.numel() for n, p in model.named_parameters() if "router" in n)
    assert dense["trainable (routers)"] == routers
    assert dense["total"] == sum(p.numel() for p in model.parameters())
    assert dense["one dense model"] == sum(p.numel() for p in CLIPModel.from_pretrained(toy_clip_dir).parameters())
    assert pruned["one dense model"] == dense["one dense model"]
    # E-WEMoE: a single router and about a tenth of the task-vector entries.
    assert pruned["trainable (routers)"] * 2 == dense["trainable (routers)"]  # 2 blocks share one router
    assert 0.09 < pruned["task vectors (stored)"] / dense["task vectors (stored)"] < 0.11

    assert main(["wemoe-params", str(toy_clip_dir)]) == 1
    assert "not a WEMoE" in capsys.readouterr().err
    assert main(["merge-wemoe", *common, "--output_dir", str(tmp_path / "bad"), "--router_depth", "5"]) == 1
    assert "router_depth must be 0, 1 or 2" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
