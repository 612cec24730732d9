"""Test-time adaptation (WEMoE / AdaMerging): the entropy loss, one shuffled batch of every task per step, only the
trainable parameters change, the entropy goes down, and `hf-moe tta-wemoe` resumes from its last complete
checkpoint and leaves a finished run untouched."""

import json

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPProcessor

from hf_moe.cli import main
from hf_moe.evaluation import DEFAULT_TEMPLATES
from hf_moe.toy_data import digit_images, save_digit_class_folders
from hf_moe.training import JOB_FILE
from hf_moe.we_moe.tta import (
    HEADS_FILE,
    INPUTS_KEY,
    TaskBatches,
    TTAScriptArguments,
    TTATrainer,
    TTATrainingArguments,
    entropy_loss,
    load_tasks,
    zero_shot_heads,
)

from helpers import save_vision_finetunes


STAND_IN = [r"post_layernorm"]  # a dense CLIP has no router: its final vision LayerNorm stands in for one
FLAGS = ["--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0", "--disable_tqdm", "true"]
FLAGS += ["--per_device_train_batch_size", "4", "--learning_rate", "0.01", "--trainable_parameters", *STAND_IN]


def test_entropy_loss_matches_a_straightforward_reference():
    torch.manual_seed(0)
    logits = torch.randn(5, 7) * 4
    expected = 0.0
    for row in logits:
        p = torch.exp(row) / torch.exp(row).sum()
        expected += -sum(float(q) * float(torch.log(q + 1e-8)) for q in p)
    assert entropy_loss(logits).item() == pytest.approx(expected / 5, rel=1e-5)


def image_dataset(count, offset=0):
    images, labels = digit_images(count, size=32, offset=offset)
    return datasets.Dataset.from_dict({"image": images, "label": labels}).cast_column("image", datasets.Image())


@pytest.fixture(scope="module")
def processor(toy_clip_dir):
    return CLIPProcessor.from_pretrained(toy_clip_dir)


@pytest.fixture(scope="module")
def tasks():
    return {"a": image_dataset(10), "b": image_dataset(6, offset=50)}


def test_task_batches_hold_one_shuffled_batch_of_every_task(tasks, processor):
    batches = TaskBatches(tasks, processor.image_processor, batch_size=4, num_batches=6, seed=3)
    item = batches[0][INPUTS_KEY]
    assert set(item) == {"a", "b"} and all(value.shape == (4, 3, 32, 32) for value in item.values())
    # Task b (6 images): items 0-2 cover 12 positions = two passes, each a permutation of its rows.
    rows = [row for k in range(3) for row in batches.indices(1, k)]
    assert sorted(rows[:6]) == list(range(6)) and sorted(rows[6:]) == list(range(6))
    assert rows[:6] != list(range(6)) or rows[6:] != list(range(6))  # shuffled
    again = TaskBatches(tasks, processor.image_processor, batch_size=4, num_batches=6, seed=3)
    assert [again.indices(0, k) for k in (2, 1)] == [batches.indices(0, k) for k in (2, 1)]  # any order, same rows
    torch.testing.assert_close(again[2][INPUTS_KEY]["b"], batches[2][INPUTS_KEY]["b"])
    other = TaskBatches(tasks, processor.image_processor, batch_size=4, num_batches=6, seed=4)
    assert [other.indices(0, k) for k in range(3)] != [batches.indices(0, k) for k in range(3)]


class RecordingTTATrainer(TTATrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen.append({task: tuple(value.shape) for task, value in inputs[INPUTS_KEY].items()})
        return super().compute_loss(model, inputs, *args, **kwargs)


def mean_entropy(model, heads, batch):
    with torch.no_grad():
        total = 0.0
        for task, pixel_values in batch.items():
            embeds = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output)
            total += entropy_loss(model.logit_scale.exp() * embeds @ heads[task].T).item()
    return total


def test_tta_changes_only_the_trainable_parameters_and_lowers_the_entropy(toy_clip_dir, processor, tasks, tmp_path):
    model = CLIPModel.from_pretrained(toy_clip_dir)
    names = {"a": ["zero", "one", "two"], "b": ["three", "four", "five", "six"]}
    heads = zero_shot_heads(model, processor, names, {task: ("a photo of a {}.",) for task in names})
    assert heads["a"].shape == (3, 32) and torch.allclose(heads["b"].norm(dim=-1), torch.ones(4))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    probe = TaskBatches(tasks, processor.image_processor, batch_size=6, num_batches=1, seed=9)[0][INPUTS_KEY]
    entropy_before = mean_entropy(model, heads, probe)
    args = TTATrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=0.02,
        trainable_parameters=STAND_IN,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=3,
    )
    assert (args.weight_decay, args.lr_scheduler_type, args.max_grad_norm) == (0.0, "cosine", 0.0)
    dataset = TaskBatches(tasks, processor.image_processor, 4, num_batches=6, seed=args.seed)
    trainer = RecordingTTATrainer(model=model, args=args, train_dataset=dataset, heads=heads)
    # One backward: gradients reach the trainable parameters only.
    loss = trainer.compute_loss(model, dataset[0])
    loss.backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == ("post_layernorm" in name), name
    model.zero_grad(set_to_none=True)
    trainer.seen.clear()
    trainer.train()
    assert trainer.seen == [{"a": (4, 3, 32, 32), "b": (4, 3, 32, 32)}] * 6  # every task in every step
    # Each training log carries every task's mean entropy since the previous log.
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all({"entropy/a", "entropy/b"} <= set(entry) for entry in logged)
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"}
    assert mean_entropy(model, heads, probe) < entropy_before - 1e-3


def test_task_folders_named_like_the_papers_tasks_get_clips_templates(tmp_path):
    svhn, mine = save_digit_class_folders(tmp_path / "SVHN", 4), save_digit_class_folders(tmp_path / "mine", 4)
    _, names, templates = load_tasks(TTAScriptArguments(model="unused", tasks=[str(svhn), str(mine)]))
    assert templates == {"SVHN": ('a photo of the number: "{}".',), "mine": DEFAULT_TEMPLATES}
    assert names["SVHN"] == names["mine"] and "zero" in names["mine"]
    _, _, templates = load_tasks(TTAScriptArguments(model="unused", tasks=[str(svhn)], templates=["imagenet"]))
    assert len(templates["SVHN"]) == 80
    with pytest.raises(ValueError, match="distinct names"):
        load_tasks(TTAScriptArguments(model="unused", tasks=[str(svhn), str(svhn)]))


# ---- hf-moe tta-wemoe: resume, finished runs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta-tasks")
    return [save_digit_class_folders(root / "digits_a", 12), save_digit_class_folders(root / "digits_b", 10, 32, 40)]


def tta(model, task_dirs, out, *extra):
    tasks = [str(task) for task in task_dirs]
    return main(["tta-wemoe", "--model", str(model), "--tasks", *tasks, "--output_dir", str(out), *FLAGS, *extra])


def snapshot(folder):
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_tta_wemoe_resumes_from_the_last_complete_checkpoint(toy_clip_dir, task_dirs, tmp_path, caplog):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    args = ["--max_steps", "4", "--save_steps", "2", "--templates", "default"]
    assert tta(toy_clip_dir, task_dirs, reference, *args) == 0
    assert tta(toy_clip_dir, task_dirs, interrupted, *args) == 0
    card = (reference / "README.md").read_text()
    assert "tta-wemoe" in card and "digits_a" in card and (reference / "tokenizer.json").is_file()
    heads = json.loads((reference / HEADS_FILE).read_text())
    assert heads["digits_b"]["templates"] == list(DEFAULT_TEMPLATES) and "zero" in heads["digits_a"]["class_names"]
    # What a kill during the step-4 checkpoint write leaves.
    (interrupted / "checkpoint-4" / "trainer_state.json").unlink()
    (interrupted / "model.safetensors").unlink()
    (interrupted / "config.json").unlink()
    job = json.loads((interrupted / JOB_FILE).read_text())
    (interrupted / JOB_FILE).write_text(json.dumps({**job, "complete": False}))
    with caplog.at_level("WARNING"):
        assert tta(toy_clip_dir, task_dirs, interrupted, *args) == 0
    assert f"Resuming test-time adaptation from {interrupted / 'checkpoint-2'}" in caplog.text
    expected, resumed = load_file(reference / "model.safetensors"), load_file(interrupted / "model.safetensors")
    original = load_file(toy_clip_dir / "model.safetensors")
    key = "vision_model.post_layernorm.weight"
    assert not torch.equal(expected[key], original[key])
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], msg=key)
    assert json.loads((interrupted / JOB_FILE).read_text())["complete"] is True
    # A finished run is left untouched; a changed one is refused.
    before = snapshot(reference)
    assert tta(toy_clip_dir, task_dirs, reference, *args) == 0
    assert snapshot(reference) == before
    assert tta(toy_clip_dir, task_dirs[:1], reference, *args) == 1
    assert snapshot(reference) == before


# ---- AdaMerging ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned_dirs(toy_clip_dir, tmp_path_factory):
    """Two "fine-tunes" of the toy CLIP: its vision tower moved by small random task vectors."""
    root = tmp_path_factory.mktemp("adamerging")
    return save_vision_finetunes(toy_clip_dir, root)


def adamerging_wrapper(toy_clip_dir, finetuned_dirs, **kwargs):
    from hf_moe.merging import load_for_merge, task_vectors
    from hf_moe.we_moe.adamerging import AdaMergingCLIP

    model, base_state, finetuned_states = load_for_merge(toy_clip_dir, finetuned_dirs)
    return AdaMergingCLIP(model, task_vectors(base_state, finetuned_states), **kwargs), base_state, finetuned_states


def test_adamerging_at_init_is_the_task_arithmetic_merge(toy_clip_dir, finetuned_dirs, tasks, processor):
    from hf_moe.merging import merge_state_dicts, task_vectors
    from hf_moe.we_moe.adamerging import adamerging_merge

    wrapper, base_state, finetuned_states = adamerging_wrapper(toy_clip_dir, finetuned_dirs)
    assert wrapper.merge_coefficients.shape == (len(base_state), 2)  # one coefficient per tensor and task
    expected = merge_state_dicts("task_arithmetic", base_state, finetuned_states, scaling=0.3)
    merged = wrapper.merged_vision_parameters()
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], msg=key)
    # The registered method applies learned coefficients the same way.
    registered = merge_state_dicts(
        "adamerging", base_state, finetuned_states, coefficients=wrapper.coefficients_by_key()
    )
    for key in merged:
        torch.testing.assert_close(registered[key], expected[key], msg=key)
    # Coefficients are clamped to [0, 1] in the merge, as in the original: 1.7 merges as 1.0.
    ones = {key: [1.0, 1.0] for key in merged}
    clamped = adamerging_merge(base_state, task_vectors(base_state, finetuned_states), {k: [1.7, 1.0] for k in merged})
    for key, value in adamerging_merge(base_state, task_vectors(base_state, finetuned_states), ones).items():
        torch.testing.assert_close(clamped[key], value, msg=key)
    reference = CLIPModel.from_pretrained(toy_clip_dir).eval()
    reference.vision_model.load_state_dict(expected)
    pixel_values = TaskBatches(tasks, processor.image_processor, 3, 1)[0][INPUTS_KEY]["a"]
    with torch.no_grad():
        torch.testing.assert_close(
            wrapper.eval().get_image_features(pixel_values=pixel_values),
            reference.get_image_features(pixel_values=pixel_values).pooler_output,
        )
    blocks, _, _ = adamerging_wrapper(toy_clip_dir, finetuned_dirs, granularity="block")
    assert blocks.merge_coefficients.shape[0] < len(base_state)  # one per encoder block + the other tensors


def test_adamerging_trains_only_its_coefficients_and_exports_a_clip_model(
    toy_clip_dir, finetuned_dirs, task_dirs, tmp_path
):
    from hf_moe.we_moe.adamerging import COEFFICIENTS_FILE, AdaMergingScriptArguments, adamerging

    wrapper, _, _ = adamerging_wrapper(toy_clip_dir, finetuned_dirs)
    heads = zero_shot_heads(
        wrapper, CLIPProcessor.from_pretrained(toy_clip_dir), {"a": ["zero", "one"]}, {"a": ("{}",)}
    )
    args = TTATrainingArguments(
        output_dir=str(tmp_path / "unused"), trainable_parameters=[r"^merge_coefficients$"], report_to="none"
    )
    trainer = TTATrainer(model=wrapper, args=args, heads=heads)
    pixel_values = torch.randn(4, 3, 32, 32)
    trainer.compute_loss(wrapper, {INPUTS_KEY: {"a": pixel_values}}).backward()
    grads = {name: parameter.grad for name, parameter in wrapper.named_parameters()}
    assert grads.pop("merge_coefficients").abs().sum() > 0
    assert all(grad is None for grad in grads.values())

    out = tmp_path / "adamerged"
    script_args = AdaMergingScriptArguments(
        pretrained=str(toy_clip_dir),
        finetuned=[str(folder) for folder in finetuned_dirs],
        tasks=[str(folder) for folder in task_dirs],
        templates=["default"],
    )
    training_args = TTATrainingArguments(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    assert adamerging(script_args, training_args) == out
    merged = CLIPModel.from_pretrained(out)
    coefficients = json.loads((out / COEFFICIENTS_FILE).read_text())["coefficients"]
    assert any(abs(value - 0.3) > 1e-4 for values in coefficients.values() for value in values)  # learned
    original = CLIPModel.from_pretrained(toy_clip_dir)
    for (name, value), (_, before) in zip(
        merged.text_model.state_dict().items(), original.text_model.state_dict().items()
    ):
        assert torch.equal(value, before), name
    assert "AdaMerging" in (out / "README.md").read_text() and (out / "checkpoint-2").is_dir()


# ---- WEMoE ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_reduce", [False, True])
def test_tta_of_a_wemoe_trains_only_its_routers(toy_clip_dir, finetuned_dirs, tasks, processor, tmp_path, batch_reduce):
    from transformers import AutoModel

    from hf_moe.conversion import merge_wemoe

    merge_wemoe(toy_clip_dir, finetuned_dirs, tmp_path / "wemoe", batch_reduce=batch_reduce)
    model = AutoModel.from_pretrained(tmp_path / "wemoe")
    names = {"a": ["zero", "one", "two"], "b": ["three", "four"]}
    heads = zero_shot_heads(model, processor, names, {task: ("a photo of a {}.",) for task in names})
    args = TTATrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=0.01,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    dataset = TaskBatches(tasks, processor.image_processor, 4, num_batches=4, seed=0)
    trainer = TTATrainer(model=model, args=args, train_dataset=dataset, heads=heads)
    batch = dataset[0]
    loss = trainer.compute_loss(model, batch)
    # The loss is the sum over tasks of each task's own forward (batch_reduce: one merge per TASK batch).
    expected = sum(mean_entropy(model, heads, {task: value}) for task, value in batch[INPUTS_KEY].items())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    with_grad = {name for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert with_grad and all("router" in name for name in with_grad)
    assert with_grad == {name for name, parameter in model.named_parameters() if "router" in name}
    if batch_reduce:
        return  # training is the same either way
    model.zero_grad(set_to_none=True)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    probe = TaskBatches(tasks, processor.image_processor, batch_size=6, num_batches=1, seed=9)[0][INPUTS_KEY]
    entropy_before = mean_entropy(model, heads, probe)
    trainer.train()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("router" in name for name in changed)
    assert mean_entropy(model, heads, probe) < entropy_before


def test_tta_wemoe_refuses_a_model_without_routers_writing_nothing(toy_clip_dir, task_dirs, tmp_path, capsys):
    tasks = [str(task) for task in task_dirs]
    out = tmp_path / "out"
    assert main(["tta-wemoe", "--model", str(toy_clip_dir), "--tasks", *tasks, "--output_dir", str(out)]) == 1
    assert "matches --trainable_parameters ['router']" in capsys.readouterr().err
    assert not out.exists()


# ---- the merge's task names --------------------------------------------------------------------------------------


def test_task_folders_are_named_by_the_task_names_the_wemoe_stores(tmp_path, caplog):
    from hf_moe.we_moe.tta import task_names

    folders = [str(tmp_path / "SVHN"), str(tmp_path / "dtd")]
    assert task_names(folders) == ["SVHN", "dtd"]  # no stored names: the folders'
    assert task_names(folders, stored=["dtd", "mnist", "svhn"]) == ["svhn", "dtd"]  # spelt as the model stores them
    assert task_names(folders, ["mnist", "dtd"], stored=["dtd", "mnist", "svhn"]) == ["mnist", "dtd"]
    # Folders none of whose names the model stores, as many as its tasks: its tasks in the merge's order, warned.
    others = [str(tmp_path / "digits_a"), str(tmp_path / "digits_b")]
    with caplog.at_level("WARNING"):
        assert task_names(others, stored=["a", "b"]) == ["a", "b"]
    assert "['a', 'b']" in caplog.text and "['digits_a', 'digits_b']" in caplog.text
    # A name the model does not store, among ones it does (or named explicitly): refused, naming the folder.
    with pytest.raises(ValueError, match=r"'.*digits_b' is task 'digits_b'.*\['digits_a', 'other'\].*digits_b'\]"):
        task_names(others, stored=["digits_a", "other"])
    with pytest.raises(ValueError, match="which the model does not store"):
        task_names(others, ["x", "y"], stored=["a", "b"])
    with pytest.raises(ValueError, match="one name per --tasks folder"):
        task_names(others, ["a"], stored=["a", "b"])


def test_tta_wemoe_refuses_task_folders_the_merge_does_not_name_writing_nothing(
    toy_clip_dir, finetuned_dirs, task_dirs, tmp_path, capsys
):
    from hf_moe.conversion import merge_wemoe

    wemoe = tmp_path / "wemoe"
    merge_wemoe(toy_clip_dir, finetuned_dirs, wemoe, task_names=["digits_a", "svhn"], return_model=False)
    out = tmp_path / "out"
    assert tta(wemoe, task_dirs, out, "--max_steps", "1") == 1
    error = capsys.readouterr().err
    assert f"Task folder '{task_dirs[1]}' is task 'digits_b'" in error
    assert "['digits_a', 'svhn']" in error and "['digits_a', 'digits_b']" in error
    assert not out.exists()
    # Named by --task_names as the model stores them, the same folders adapt, under the model's names.
    assert tta(wemoe, task_dirs, out, "--max_steps", "1", "--task_names", "digits_a", "svhn") == 0
    assert sorted(json.loads((out / HEADS_FILE).read_text())) == ["digits_a", "svhn"]


def test_task_folders_of_the_same_name_are_named_by_task_names(tmp_path):
    from hf_moe.we_moe.tta import task_names

    folders = [str(tmp_path / task / "test") for task in ("svhn", "stanford-cars")]
    with pytest.raises(ValueError, match="distinct names.*--task_names svhn mnist"):
        task_names(folders)
    assert task_names(folders, ["svhn", "stanford-cars"]) == ["svhn", "stanford-cars"]
    for task in ("svhn", "stanford-cars"):
        save_digit_class_folders(tmp_path / task / "test", 4)
    args = TTAScriptArguments(model="unused", tasks=folders, task_names=["svhn", "stanford-cars"])
    _, _, templates = load_tasks(args)
    # CLIP's templates of the paper's tasks by the task's name where the folder's is no task's.
    assert templates["svhn"] == ('a photo of the number: "{}".',) and len(templates["stanford-cars"]) == 8
