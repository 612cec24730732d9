"""End to end on small real data (scikit-learn digits): a tiny CLIP, two MCL stages, the CLIP-MoE, router
training, evaluation of the result."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import hf_moe.clip_moe.mcl
from hf_moe.cli import main
from hf_moe.clip_moe.mcl import MCLArguments, run_mcl
from hf_moe.clip_moe.trainer import CLIPMoETrainer, CLIPMoETrainingArguments
from hf_moe.data import ImageTextCollator, load_image_text_dataset
from hf_moe.toy import save_toy_clip
from hf_moe.toy_data import save_digit_caption_folder, save_digit_class_folders


class RecordingCollator(ImageTextCollator):
    """Records the dataset indices of every batch it builds."""

    batches: list[list[int]] = []

    def __call__(self, rows):
        batch = super().__call__(rows)
        if "index" in batch:
            RecordingCollator.batches.append(batch["index"].tolist())
        return batch


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
def recipe(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("recipe")
    base = save_toy_clip(root / "base")
    data = save_digit_caption_folder(root / "captions", count=96)
    mp = pytest.MonkeyPatch()
    mp.setattr(hf_moe.clip_moe.mcl, "ImageTextCollator", RecordingCollator)
    RecordingCollator.batches = []
    args = MCLArguments(base=str(base), data=str(data), num_experts=3, top_k=2, image_clusters=2, text_clusters=2)
    moe_dir = run_mcl(args, training_args(root / "mcl"))
    mp.undo()
    return {"root": root, "base": base, "data": data, "moe": moe_dir, "batches": list(RecordingCollator.batches)}


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


def test_rerunning_mcl_resumes_instead_of_retraining(recipe, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in (recipe["root"] / "mcl").glob("stage*/model.safetensors")}
    args = MCLArguments(
        base=str(recipe["base"]), data=str(recipe["data"]), num_experts=3, image_clusters=2, text_clusters=2
    )
    assert run_mcl(args, training_args(recipe["root"] / "mcl")) == recipe["moe"]
    assert before == {p: p.stat().st_mtime_ns for p in (recipe["root"] / "mcl").glob("stage*/model.safetensors")}


def full_data_loss(model_dir, data, args):
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor_dir = model_dir
    from transformers import AutoProcessor

    collator = ImageTextCollator(AutoProcessor.from_pretrained(processor_dir))
    dataset = load_image_text_dataset(data)
    trainer = CLIPMoETrainer(model=model, args=args, data_collator=collator)
    with torch.no_grad():
        batch = collator([dataset[i] for i in range(len(dataset))])
        return trainer.compute_loss(model, dict(batch)).item(), model


def test_router_training_changes_only_routers_and_lowers_the_loss(recipe):
    out = recipe["root"] / "routed"
    args = ["--model", str(recipe["moe"]), "--data", str(recipe["data"]), "--output_dir", str(out)]
    flags = [
        "--max_steps",
        "12",
        "--per_device_train_batch_size",
        "16",
        "--learning_rate",
        "0.05",
        "--report_to",
        "none",
    ]
    flags += ["--use_cpu", "--save_strategy", "no", "--logging_steps", "4"]
    assert main(["train-router", *args, *flags]) == 0
    eval_args = training_args(recipe["root"] / "eval-tmp")
    loss_before, before = full_data_loss(recipe["moe"], recipe["data"], eval_args)
    loss_after, after = full_data_loss(out, recipe["data"], eval_args)
    assert loss_after < loss_before
    after_params = dict(after.named_parameters())
    changed = [n for n, p in before.named_parameters() if not torch.equal(p, after_params[n])]
    assert changed and all(name.endswith(".mlp.router.weight") for name in changed)


def test_trained_model_evaluates(recipe, tmp_path):
    routed = recipe["root"] / "routed"
    if not routed.exists():
        pytest.skip("needs the router-training test's output")
    classes = save_digit_class_folders(tmp_path / "classes", count=30)
    captions = save_digit_caption_folder(tmp_path / "retrieval", count=12, offset=500, captions_per_image=2)
    main(["eval", "zero-shot", "--model", str(routed), "--data", str(classes), "--output", str(tmp_path / "zs.json")])
    main(["eval", "retrieval", "--model", str(routed), "--data", str(captions), "--output", str(tmp_path / "r.json")])
    zero_shot = json.loads((tmp_path / "zs.json").read_text())
    retrieval = json.loads((tmp_path / "r.json").read_text())
    assert zero_shot["num_images"] == 30 and 0 <= zero_shot["top1_accuracy"] <= 1
    assert retrieval["text_to_image_R@10"] >= retrieval["text_to_image_R@1"]


def test_router_training_resumes_from_its_last_checkpoint(recipe, tmp_path, caplog):
    out = tmp_path / "resumed"
    args = ["--model", str(recipe["moe"]), "--data", str(recipe["data"]), "--output_dir", str(out)]
    flags = ["--per_device_train_batch_size", "16", "--report_to", "none", "--use_cpu", "--save_steps", "2"]
    assert main(["train-router", *args, *flags, "--max_steps", "2"]) == 0  # "interrupted" after step 2
    assert (out / "checkpoint-2").is_dir()
    with caplog.at_level("WARNING"):
        assert main(["train-router", *args, *flags, "--max_steps", "4"]) == 0
    assert f"Resuming router training from {out / 'checkpoint-2'}" in caplog.text
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
