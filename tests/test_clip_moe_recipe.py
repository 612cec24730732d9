"""End to end on small real data (scikit-learn digits): a tiny CLIP, two MCL stages, the CLIP-MoE, router
training, evaluation of the result."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

import hf_moe.clip_moe.mcl
from hf_moe.cli import main
from hf_moe.clip_moe.mcl import MCLArguments, run_mcl
from hf_moe.clip_moe.trainer import CLIPMoETrainer, CLIPMoETrainingArguments
from hf_moe.data import ImageTextCollator, load_image_text_dataset
from hf_moe.toy import save_toy_clip
from hf_moe.toy_data import save_digit_caption_folder, save_digit_class_folders
from hf_moe.training import JobMismatchError


def training_args(output_dir, **overrides):
    fields = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return CLIPMoETrainingArguments(**{**fields, **overrides})


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    base = save_toy_clip(root / "base")
    data = save_digit_caption_folder(root / "captions", count=96)
    batches = []  # the dataset indices of every batch MCL builds, in order

    class RecordingCollator(ImageTextCollator):
        def __call__(self, rows):
            batch = super().__call__(rows)
            if "index" in batch:
                batches.append(batch["index"].tolist())
            return batch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_moe.clip_moe.mcl, "ImageTextCollator", RecordingCollator)
        moe_dir = run_mcl(mcl_arguments(base, data), training_args(root / "mcl"))
    return {"root": root, "base": base, "data": data, "moe": moe_dir, "batches": batches}


def mcl_arguments(base, data, **overrides):
    fields = dict(base=str(base), data=str(data), num_experts=3, top_k=2, image_clusters=2, text_clusters=2)
    return MCLArguments(**{**fields, **overrides})


def snapshot(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_mcl_stages_differ_from_the_base_only_in_mlp_weights(recipe):
    stages = [load_file(recipe["root"] / "mcl" / f"stage{s}" / "model.safetensors") for s in range(3)]
    for stage in stages[1:]:
        changed = [key for key in stage if not torch.equal(stage[key], stages[0][key])]
        assert changed and all(".mlp." in key for key in changed)
    assert not torch.equal(
        stages[1]["vision_model.encoder.layers.0.mlp.fc1.weight"],
        stages[2]["vision_model.encoder.layers.0.mlp.fc1.weight"],
    )


def test_every_mcl_training_batch_is_cluster_homogeneous(recipe):
    root = recipe["root"] / "mcl"
    labels_1 = load_file(root / "labels" / "stage1.safetensors")["labels"]
    labels_2 = load_file(root / "labels" / "stage2.safetensors")["labels"]
    accumulated = {1: labels_1, 2: labels_1 * 4 + labels_2}
    training_batches = [b for b in recipe["batches"] if len(b) == 4]
    assert len(training_batches) == 6  # 3 steps in each of 2 stages
    for stage, batches in ((1, training_batches[:3]), (2, training_batches[3:])):
        for batch in batches:
            assert len(set(accumulated[stage][batch].tolist())) == 1, (stage, batch)


def test_mcl_builds_the_moe_from_the_stages(recipe):
    model = AutoModel.from_pretrained(recipe["moe"], trust_remote_code=True)
    stage2 = load_file(recipe["root"] / "mcl" / "stage2" / "model.safetensors")
    torch.testing.assert_close(
        model.vision_model.encoder.layers[1].mlp.experts.up_proj[2],
        stage2["vision_model.encoder.layers.1.mlp.fc1.weight"],
    )


def test_rerunning_mcl_resumes_instead_of_retraining(recipe, caplog):
    before = snapshot(recipe["root"] / "mcl")
    with caplog.at_level("WARNING"):
        assert (
            run_mcl(mcl_arguments(recipe["base"], recipe["data"]), training_args(recipe["root"] / "mcl"))
            == recipe["moe"]
        )
    assert "already complete" in caplog.text
    assert snapshot(recipe["root"] / "mcl") == before


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_experts=4), "--num_experts: 3 (recorded) vs 4 (now)"),
        (dict(top_k=1), "--top_k: 2 (recorded) vs 1 (now)"),
        (dict(long_text=False), "--long_text: true (recorded) vs false (now)"),
        (dict(image_clusters=3), "--image_clusters: 2 (recorded) vs 3 (now)"),
        ("base", "--base:"),
        ("data", "data: 97 files"),  # 96 images + metadata.jsonl
    ],
)
def test_rerunning_mcl_with_other_options_or_inputs_is_refused(recipe, tmp_path, change, message):
    if change == "base":
        change = dict(base=save_toy_clip(tmp_path / "other-base", seed=1))
    elif change == "data":
        change = dict(data=save_digit_caption_folder(tmp_path / "other-captions", count=95))
    before = snapshot(recipe["root"] / "mcl")
    with pytest.raises(JobMismatchError) as error:
        run_mcl(
            mcl_arguments(**{"base": recipe["base"], "data": recipe["data"], **change}),
            training_args(recipe["root"] / "mcl"),
        )
    assert message in str(error.value)
    assert snapshot(recipe["root"] / "mcl") == before


def test_mcl_refuses_a_changed_training_option(recipe):
    with pytest.raises(JobMismatchError, match=r"--learning_rate: 0.001 \(recorded\) vs 0.002 \(now\)"):
        run_mcl(
            mcl_arguments(recipe["base"], recipe["data"]),
            training_args(recipe["root"] / "mcl", learning_rate=2e-3),
        )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top_k", "4"], "top_k must be between 1 and num_experts=3, got 4"),
        (["--feature_shard_size", "0"], "feature_shard_size must be at least 1, got 0"),
        (["--num_experts", "1"], "num_experts >= 2"),
    ],
)
def test_mcl_checks_its_options_before_any_work(recipe, tmp_path, capsys, flags, message):
    out = tmp_path / "mcl"
    argv = ["mcl", "--base", str(recipe["base"]), "--data", str(recipe["data"]), "--output_dir", str(out)]
    argv += ["--num_experts", "3", *flags, "--use_cpu", "--report_to", "none"]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_mcl_refuses_a_clip_moe_as_base(recipe, tmp_path, capsys):
    out = tmp_path / "mcl"
    argv = ["mcl", "--base", str(recipe["moe"]), "--data", str(recipe["data"]), "--output_dir", str(out)]
    assert main([*argv, "--use_cpu", "--report_to", "none"]) == 1
    error = capsys.readouterr().err
    assert "already a CLIP-MoE" in error and str(recipe["moe"]) in error
    assert not out.exists()


def test_mcl_moe_has_a_model_card_and_is_pushed_when_asked(recipe, monkeypatch):
    from huggingface_hub import ModelCard

    card = ModelCard.load(recipe["moe"] / "README.md")
    # The base is a local folder whose card names no Hub model: the card names it in the text, not as base_model
    # (the Hub rejects paths there).
    assert card.data.base_model is None and str(recipe["base"]) in card.text and "mcl" in card.data.tags
    assert "| `num_experts` | `3` |" in card.text and "| `top_k` | `2` |" in card.text
    calls = mock_hub(monkeypatch)
    before = snapshot(recipe["root"] / "mcl")
    args = training_args(recipe["root"] / "mcl", push_to_hub=True, hub_model_id="me/clip-moe-mcl")
    assert run_mcl(mcl_arguments(recipe["base"], recipe["data"]), args) == recipe["moe"]
    assert calls[0] == ("create", "me/clip-moe-mcl")
    assert calls[1][1]["repo_id"] == "me/clip-moe-mcl" and calls[1][1]["folder_path"] == recipe["moe"]
    assert snapshot(recipe["root"] / "mcl") == before


def mock_hub(monkeypatch) -> list:
    """Replace hf_moe.hub's Hub calls by recorders; returns the list of calls made."""
    import hf_moe.hub

    calls = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create", repo_id))
        return _Url(repo_id)

    monkeypatch.setattr(hf_moe.hub, "create_repo", create_repo)
    monkeypatch.setattr(hf_moe.hub, "upload_folder", lambda **kwargs: calls.append(("upload", kwargs)))
    return calls


class _Url(str):
    def __new__(cls, repo_id):
        url = super().__new__(cls, f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url


def full_data_loss(model_dir, data, args):
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    collator = ImageTextCollator(AutoProcessor.from_pretrained(model_dir))
    dataset = load_image_text_dataset(data)
    trainer = CLIPMoETrainer(model=model, args=args, data_collator=collator)
    with torch.no_grad():
        batch = collator([dataset[i] for i in range(len(dataset))])
        return trainer.compute_loss(model, dict(batch)).item(), model


ROUTER_FLAGS = ["--per_device_train_batch_size", "16", "--learning_rate", "0.05", "--warmup_steps", "0"]
ROUTER_FLAGS += ["--report_to", "none", "--use_cpu", "--save_strategy", "no", "--logging_steps", "4"]


@pytest.fixture(scope="module")
def routed(recipe):
    """The MCL CLIP-MoE with trained routers (12 steps)."""
    out = recipe["root"] / "routed"
    args = ["--model", str(recipe["moe"]), "--data", str(recipe["data"]), "--output_dir", str(out)]
    assert main(["train-router", *args, *ROUTER_FLAGS, "--max_steps", "12"]) == 0
    return out


def test_router_training_changes_only_routers_and_lowers_the_loss(recipe, routed):
    eval_args = training_args(recipe["root"] / "eval-tmp")
    loss_before, before = full_data_loss(recipe["moe"], recipe["data"], eval_args)
    loss_after, after = full_data_loss(routed, recipe["data"], eval_args)
    assert loss_after < loss_before
    after_params = dict(after.named_parameters())
    changed = [n for n, p in before.named_parameters() if not torch.equal(p, after_params[n])]
    assert changed and all(name.endswith(".mlp.router.weight") for name in changed)


def test_trained_model_evaluates(routed, tmp_path):
    classes = save_digit_class_folders(tmp_path / "classes", count=30)
    captions = save_digit_caption_folder(tmp_path / "retrieval", count=12, offset=500, captions_per_image=2)
    main(["eval", "zero-shot", "--model", str(routed), "--data", str(classes), "--output", str(tmp_path / "zs.json")])
    main(["eval", "retrieval", "--model", str(routed), "--data", str(captions), "--output", str(tmp_path / "r.json")])
    zero_shot = json.loads((tmp_path / "zs.json").read_text())
    retrieval = json.loads((tmp_path / "r.json").read_text())
    assert zero_shot["num_images"] == 30 and 0 <= zero_shot["top1_accuracy"] <= 1
    assert retrieval["text_to_image_R@10"] >= retrieval["text_to_image_R@1"]


def test_router_training_writes_its_card_and_pushes_only_the_final_folder(recipe, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    calls = mock_hub(monkeypatch)
    out = tmp_path / "routed"
    args = ["--model", str(recipe["moe"]), "--data", str(recipe["data"]), "--output_dir", str(out)]
    flags = [*ROUTER_FLAGS[:-4], "--max_steps", "2", "--save_steps", "1"]
    hub = ["--push_to_hub", "--hub_model_id", "me/clip-moe-routed"]
    assert main(["train-router", *args, *flags, *hub, "--report_to", "none", "--use_cpu"]) == 0
    # One push, by us, of the final folder (the Trainer pushes nothing itself, not even its checkpoints).
    assert [call[0] for call in calls] == ["create", "upload"] and calls[0][1] == "me/clip-moe-routed"
    upload = calls[1][1]
    assert upload["repo_id"] == "me/clip-moe-routed" and upload["folder_path"] == out
    assert "checkpoint-*" in upload["ignore_patterns"]
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None and str(recipe["moe"]) in card.text and "clip-moe" in card.data.tags
    assert "--balance_loss_weights paper" in card.text and "| `max_steps` | `2` |" in card.text
    assert "model_id = 'me/clip-moe-routed'" in card.text
