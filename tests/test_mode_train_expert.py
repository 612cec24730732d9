"""`hf-moe mode train-expert`: the whole seed CLIP trained on its expert's rows only, resumable, refusing bad input
and changed re-runs before writing anything; gradient checkpointing changes nothing numerically."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, CLIPModel, TrainerCallback

from hf_moe.data import ImageTextCollator, load_image_text_dataset
from hf_moe.losses import clip_contrastive_loss
from hf_moe.mode import train_expert as train_expert_module
from hf_moe.mode.data import dataset_pair_keys
from hf_moe.mode.sampling import expert_rows
from hf_moe.mode.train_expert import main
from hf_moe.training import JOB_FILE, JobMismatchError


FINE_TO_COARSE = torch.tensor([0, 1, 0, 1])  # 4 fine clusters, 2 experts
TRAINING_FLAGS = [
    "--max_steps", "4", "--save_steps", "3", "--per_device_train_batch_size", "10", "--learning_rate", "1e-3",
    "--other_share", "0.25", "--report_to", "none", "--use_cpu", "--seed", "0", "--disable_tqdm", "true",
    "--bf16", "--gradient_checkpointing",
]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(toy_clip_dir, tmp_path_factory):
    """A digit-caption folder and its clusters as `hf-moe mode cluster` writes them: fine cluster = digit % 4."""
    from hf_moe.toy_data import save_digit_caption_folder

    root = tmp_path_factory.mktemp("mode-expert")
    data = save_digit_caption_folder(root / "data", count=32)
    dataset = load_image_text_dataset(data)
    fine = torch.tensor(dataset["label"]) % len(FINE_TO_COARSE)
    clusters = root / "clusters"
    (clusters / "assignments").mkdir(parents=True)
    table = {"key": dataset_pair_keys(dataset), "fine": fine.tolist(), "coarse": FINE_TO_COARSE[fine].tolist()}
    pq.write_table(pa.table(table), clusters / "assignments" / "part-00000.parquet")
    save_file({"fine_to_coarse": FINE_TO_COARSE, "fine_centers": torch.randn(4, 8)}, clusters / "centers.safetensors")
    (clusters / "clusters.json").write_text(json.dumps(CLUSTERS_JSON))
    return {"seed": toy_clip_dir, "data": data, "clusters": clusters, "fine": fine, "root": root}


# The clusters.json of a 4-fine-cluster, 2-expert `hf-moe mode cluster` run (its encoder is not used here).
CLUSTERS_JSON = {
    "num_fine_clusters": 4,
    "num_experts": 2,
    "encoder": {"name_or_path": "toy-clip", "pooling": "clip", "max_length": 16},
}


def argv(inputs, output_dir, *extra):
    return [
        "--seed_model", str(inputs["seed"]), "--data", str(inputs["data"]), "--clusters", str(inputs["clusters"]),
        "--expert", "0", "--output_dir", str(output_dir), *TRAINING_FLAGS, *extra,
    ]  # fmt: skip


class SpyCollator(ImageTextCollator):
    """Records the row indices of every batch the Trainer collates."""

    seen: list[int] = []

    def __call__(self, rows):
        batch = super().__call__(rows)
        SpyCollator.seen.extend(batch["index"].tolist())
        return batch


class SpyTrainer(train_expert_module.DataExpertTrainer):
    """Records, per training step, whether activation checkpointing is on and the dtype the projections compute in
    (the embeddings themselves are float32: their normalisation runs in float32 under autocast)."""

    modes: list[tuple[bool, torch.dtype]] = []

    def _clip_outputs(self, model, inputs):
        unwrapped, dtypes = self.accelerator.unwrap_model(model), []
        hook = unwrapped.visual_projection.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
        try:
            outputs = super()._clip_outputs(model, inputs)
        finally:
            hook.remove()
        SpyTrainer.modes.append((unwrapped.is_activation_checkpointing, *dtypes))
        return outputs


@pytest.fixture(scope="module")
def trained(inputs):
    output = inputs["root"] / "expert-0"
    SpyCollator.seen, SpyTrainer.modes = [], []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_expert_module, "ImageTextCollator", SpyCollator)
        patch.setattr(train_expert_module, "DataExpertTrainer", SpyTrainer)
        main(argv(inputs, output))
    return output, list(SpyCollator.seen)


def expected_rows(inputs):
    return expert_rows(inputs["fine"], FINE_TO_COARSE, expert=0, other_share=0.25, seed=0)


def subset_loss(model_dir, data, rows) -> float:
    model = CLIPModel.from_pretrained(model_dir).eval()
    dataset = load_image_text_dataset(data)
    batch = ImageTextCollator(AutoProcessor.from_pretrained(model_dir))([dataset[i] for i in rows.tolist()])
    with torch.no_grad():
        out = model(**batch)
    return clip_contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp(), 0.0).item()


def test_expert_trains_the_whole_model_on_its_rows_only_and_lowers_their_loss(inputs, trained):
    output, seen = trained
    rows = expected_rows(inputs)
    # 16 own rows (digits 0, 2, 4, 6, 8 of 32) and round(0.25 * 16) others; 4 steps of 10 = 2 epochs of 20 rows.
    assert (len(rows.own), len(rows.other)) == (16, 4)
    assert sorted(seen[:20]) == sorted(seen[20:40]) == rows.indices.tolist()
    assert seen[:20] != seen[20:40]  # reshuffled per epoch
    assert SpyTrainer.modes == [(True, torch.bfloat16)] * 4  # --gradient_checkpointing and --bf16 reach every step
    seed, expert = load_file(inputs["seed"] / "model.safetensors"), load_file(output / "model.safetensors")
    assert seed.keys() == expert.keys()
    unchanged = [name for name in seed if torch.equal(seed[name], expert[name]) and "position_ids" not in name]
    assert not unchanged, f"full-model training left {unchanged} unchanged"
    assert (
        subset_loss(output, inputs["data"], rows.indices)
        < subset_loss(inputs["seed"], inputs["data"], rows.indices) - 0.05
    )
    card = (output / "README.md").read_text()
    assert "data expert 0 of 2" in card and "other share 0.25" in card and "4 steps" in card
    assert json.loads((output / JOB_FILE).read_text())["complete"]


def test_the_job_record_holds_the_expert_index_and_the_clusters_content_fingerprint(inputs, trained, tmp_path):
    from hf_moe.conversion.build_mode import clusters_id

    record = json.loads((trained[0] / JOB_FILE).read_text())
    assert record["complete"] and record["command"] == "mode train-expert"
    assert record["options"]["expert"] == 0
    # What `hf-moe mode build` compares: the same for a copy of the clusters (other path, other file times).
    copy = tmp_path / "clusters"
    shutil.copytree(inputs["clusters"], copy, copy_function=shutil.copyfile)
    assert record["options"]["clusters_id"] == clusters_id(inputs["clusters"]) == clusters_id(copy)


def test_a_finished_expert_is_left_untouched(inputs, trained, caplog):
    output, _ = trained
    before = (output / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("WARNING"):
        main(argv(inputs, output))
    assert "already trained" in caplog.text
    assert (output / "model.safetensors").stat().st_mtime_ns == before


class StopAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt("interrupted after the first checkpoint")


def test_an_interrupted_expert_resumes_to_the_same_weights(inputs, trained, tmp_path, monkeypatch, caplog):
    output = tmp_path / "expert-0"

    class InterruptedTrainer(train_expert_module.DataExpertTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, callbacks=[StopAfterFirstSave()], **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_expert_module, "DataExpertTrainer", InterruptedTrainer)
        with pytest.raises(KeyboardInterrupt):
            main(argv(inputs, output))
    assert not (output / "model.safetensors").exists()
    with caplog.at_level("WARNING"):
        main(argv(inputs, output))
    # checkpoint-3 is mid-epoch: the resumed run must skip the batches the first run already took.
    assert f"Resuming data expert 0 from {output / 'checkpoint-3'}" in caplog.text
    resumed, uninterrupted = load_file(output / "model.safetensors"), load_file(trained[0] / "model.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, msg=name)


def test_a_changed_other_share_is_refused_with_nothing_written(inputs, trained):
    output, _ = trained
    listing = sorted(p.name for p in output.iterdir())
    with pytest.raises(JobMismatchError, match=r"--other_share: 0.25 \(recorded\) vs 0.5 \(now\)"):
        main(argv(inputs, output, "--other_share", "0.5"))
    assert sorted(p.name for p in output.iterdir()) == listing


@pytest.mark.parametrize(
    "change, message",
    [
        (["--expert", "2"], r"--expert 2 is out of range: .*clusters has 2 experts \(0 to 1\)"),
        (["--other_share", "1.5"], r"--other_share must be in \[0, 1\], got 1.5"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(inputs, tmp_path, change, message):
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        main(argv(inputs, output, *change))
    assert not output.exists()


def test_a_clip_moe_seed_is_refused(inputs, upcycled_dir, tmp_path):
    output = tmp_path / "out"
    with pytest.raises(ValueError, match="already a CLIP-MoE"):
        main(argv(inputs, output, "--seed_model", str(upcycled_dir)))
    assert not output.exists()


def test_inconsistent_clusters_are_named(inputs, tmp_path):
    clusters = tmp_path / "clusters"
    clusters.mkdir()
    with pytest.raises(FileNotFoundError, match=r"clusters\.json is missing: --clusters must be a folder written"):
        main(argv(inputs, tmp_path / "out", "--clusters", str(clusters)))
    (clusters / "clusters.json").write_text(json.dumps(CLUSTERS_JSON))
    fine_to_coarse = torch.tensor([0, 1, 2, 1])
    save_file({"fine_to_coarse": fine_to_coarse, "fine_centers": torch.randn(4, 8)}, clusters / "centers.safetensors")
    with pytest.raises(ValueError, match=r"centers.safetensors: 'fine_to_coarse' holds \[2\], outside the 2 experts"):
        main(argv(inputs, tmp_path / "out", "--clusters", str(clusters)))
    assert not (tmp_path / "out").exists()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(inputs):
    from helpers import clip_inputs

    def loss_and_grads(checkpointing):
        model = CLIPModel.from_pretrained(inputs["seed"])
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        batch = clip_inputs(model.config, batch_size=4, pad=2)
        out = model(**batch)
        loss = clip_contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp(), 0.0)
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    loss, grads = loss_and_grads(False)
    loss_gc, grads_gc = loss_and_grads(True)
    torch.testing.assert_close(loss_gc, loss, atol=1e-5, rtol=0)
    assert all(grad is not None for grad in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grads_gc[name], grad, atol=1e-5, rtol=1e-5, msg=name)
