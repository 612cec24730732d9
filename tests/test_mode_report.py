"""`hf-moe mode report`: every expert column is that expert CLIP's own `zero_shot_classification`, all_unit and
ensemble equal a direct computation from the experts' CLIPs and the clustering encoder, expert-max and the average
row follow from the other cells, the CSV reads back exactly and the printed table holds every row; bad tasks and a
model that is not MoDE are refused, named, with no CSV written."""

import csv
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_mode_build import write_clusters
from transformers import BertModel, BertTokenizer, CLIPModel, CLIPProcessor

from hf_moe.evaluation import load_image_dataset, zero_shot_classification
from hf_moe.mode.build import main as build_main
from hf_moe.mode.report import evaluate_task, main
from hf_moe.modeling import MoDEModel
from hf_moe.task_data import build_task, save_task_folders
from hf_moe.toy import save_toy_clip

from helpers import save_tiny_bert


TEMPLATES = ("a {}.", "a photo of the {}.")
TASKS = ("shapes", "patterns")  # task k's classes are the fine centers of expert k
BATCH = 5  # not a divisor of the image counts: the last batch is partial


def bert_class_embeddings(bert, class_names):
    """Template-averaged normalised BERT pooler embeddings of the class prompts, written out independently of
    `MoDEModel.clustering_embeddings`: `(classes, templates, D)` and their normalised mean `(classes, D)`."""
    tokenizer, encoder = BertTokenizer.from_pretrained(bert), BertModel.from_pretrained(bert).eval()
    texts = [template.format(name) for name in class_names for template in TEMPLATES]
    with torch.no_grad():
        pooled = encoder(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
    per_template = pooled.reshape(len(class_names), len(TEMPLATES), -1)
    return per_template, F.normalize(F.normalize(per_template, dim=-1).mean(dim=1), dim=-1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mode_report")
    experts = [save_toy_clip(root / f"expert{k}", seed=k) for k in range(2)]
    bert = save_tiny_bert(root / "bert")
    tasks = {name: build_task(name, train_per_class=1, test_per_class=3, size=16) for name in TASKS}
    folders = {name: save_task_folders(task, root / name, "test") for name, task in tasks.items()}
    centers = [bert_class_embeddings(bert, tasks[name].class_names)[1] for name in TASKS]
    fine_to_coarse = torch.cat([torch.full((len(c),), k) for k, c in enumerate(centers)])
    clusters = write_clusters(
        root / "clusters",
        num_fine=len(fine_to_coarse),
        encoder=bert,
        fine=torch.cat(centers),
        fine_to_coarse=fine_to_coarse,
    )
    build_main([*map(str, experts), "--clusters", str(clusters), "--output_dir", str(root / "mode")])
    templates_file = root / "templates.txt"
    templates_file.write_text("\n".join(TEMPLATES) + "\n")
    return root, experts, bert, tasks, folders, root / "mode", templates_file


def reference_cosines(expert, dataset, class_names):
    """The expert CLIP's cosine logits `(images, classes)`, template-averaged class embeddings, all images at once."""
    clip, processor = CLIPModel.from_pretrained(expert).eval(), CLIPProcessor.from_pretrained(expert)
    texts = [template.format(name) for name in class_names for template in TEMPLATES]
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    images = [image.convert("RGB") for image in dataset["image"]]
    with torch.no_grad():
        text = F.normalize(clip.get_text_features(**tokens).pooler_output, dim=-1)
        text = F.normalize(text.reshape(len(class_names), len(TEMPLATES), -1).mean(dim=1), dim=-1)
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        image = F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    return image @ text.T


def test_report_columns_equal_direct_computations(setup, tmp_path, capsys):
    root, experts, bert, tasks, folders, mode, templates_file = setup
    output = tmp_path / "report.csv"
    argv = ["--model", str(mode), "--tasks", *map(str, folders.values()), "--templates", str(templates_file)]
    rows = main([*argv, "--output", str(output), "--batch_size", str(BATCH)])
    printed = capsys.readouterr().out

    with output.open(newline="") as handle:
        parsed = list(csv.DictReader(handle))
    expert_columns = ["expert-0", "expert-1"]
    columns = ["dataset", "num_classes", *expert_columns, "expert-max", "all_unit", "ensemble", "metric"]
    assert list(parsed[0]) == columns and {row["metric"] for row in parsed} == {"top1_accuracy"}
    assert [row["dataset"] for row in parsed] == [*TASKS, "average"]
    for row, returned in zip(parsed, rows):  # floats at full precision: the CSV is the returned rows exactly
        assert {key: value if key in ("dataset", "metric") else float(value) for key, value in row.items()} == returned

    model = MoDEModel.from_pretrained(mode).eval()
    ensemble_differs = False
    for row, name in zip(rows, TASKS):
        dataset = load_image_dataset(folders[name])
        labels = torch.tensor(dataset["label"])
        names = tasks[name].class_names
        assert row["num_classes"] == len(names)
        for k, expert in enumerate(experts):
            alone = zero_shot_classification(
                CLIPModel.from_pretrained(expert),
                CLIPProcessor.from_pretrained(expert),
                folders[name],
                templates=list(TEMPLATES),
                batch_size=BATCH,
                progress=False,
            )
            assert row[f"expert-{k}"] == alone["top1_accuracy"]
        assert row["expert-max"] == max(row[column] for column in expert_columns)

        cosines = torch.stack([reference_cosines(expert, dataset, names) for expert in experts])  # (E, N, C)
        with torch.no_grad():
            weights = model.task_weights(bert_class_embeddings(bert, names)[0])
        # The fixture's centers make each task lean on its own expert; uniform weights would not test `ensemble`.
        assert weights.argmax() == TASKS.index(name) and weights.max() > 0.6
        unit = cosines.mean(dim=0).argmax(dim=-1)
        ensemble = (weights[:, None, None] * cosines).sum(dim=0).argmax(dim=-1)
        ensemble_differs |= bool((unit != ensemble).any())
        assert row["all_unit"] == pytest.approx((unit == labels).double().mean().item(), abs=1e-9)
        assert row["ensemble"] == pytest.approx((ensemble == labels).double().mean().item(), abs=1e-9)
    assert ensemble_differs, "the fixture should make the task-adaptive ensemble differ from the uniform one"

    average = rows[-1]
    for column in ["num_classes", *expert_columns, "expert-max", "all_unit", "ensemble"]:
        assert average[column] == pytest.approx(sum(row[column] for row in rows[:-1]) / len(TASKS), abs=1e-12)

    lines = printed.strip().splitlines()
    assert len(lines) == 2 + len(rows) and len({len(line) for line in lines}) == 1  # header, rule, rows; aligned
    for line, row in zip(lines[2:], rows):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == row["dataset"]
        assert [float(cell) for cell in cells[1:-1]] == pytest.approx(list(row.values())[1:-1], abs=5e-5)
    card = (mode / "README.md").read_text()
    assert "ensemble_top1_accuracy" in card and "patterns" in card


def test_evaluate_task_predictions_are_the_experts_and_the_ensembles(setup):
    root, experts, bert, tasks, folders, mode, templates_file = setup
    model = MoDEModel.from_pretrained(mode).eval()
    processor = CLIPProcessor.from_pretrained(mode)
    name = TASKS[1]
    report = evaluate_task(model, processor, folders[name], templates=TEMPLATES, batch_size=BATCH, progress=False)
    assert report.row["dataset"] == name
    for k, expert in enumerate(experts):
        alone = zero_shot_classification(
            CLIPModel.from_pretrained(expert),
            CLIPProcessor.from_pretrained(expert),
            folders[name],
            templates=TEMPLATES,
            batch_size=BATCH,
            return_predictions=True,
            progress=False,
        )
        assert report.predictions[f"expert-{k}"] == alone["predictions"]
    with torch.no_grad():
        weights = model.task_weights(bert_class_embeddings(bert, tasks[name].class_names)[0])
    torch.testing.assert_close(report.task_weights, weights)


def test_bad_inputs_are_refused_by_name_and_nothing_written(setup, tmp_path):
    root, experts, bert, tasks, folders, mode, templates_file = setup
    flat = tmp_path / "flat"  # images, but no class sub-folders
    flat.mkdir()
    for image in sorted(folders["shapes"].rglob("*.png"))[:3]:
        shutil.copy(image, flat / image.name)
    output = tmp_path / "report.csv"
    good = str(folders["shapes"])
    cases = [
        (["--model", str(mode), "--tasks", good, str(flat)], f"Task folder '{flat}'.*label"),
        (["--model", str(mode), "--tasks", str(tmp_path / "missing")], "missing"),
        (["--model", str(experts[0]), "--tasks", good], f"'{experts[0]}' is a 'clip' model, not a MoDE model"),
        (["--model", str(mode), "--tasks", good, good], r"unique.*\['shapes'\]"),
        (["--model", str(mode), "--tasks", good, "--task_names", "a", "b"], "one name per task"),
        (["--model", str(mode), "--tasks", good, "--class_names", "x", "y"], "--class_names takes one value"),
    ]
    for argv, match in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            main([*argv, "--templates", str(templates_file), "--output", str(output)])
        assert not output.exists() and not list(tmp_path.glob("*report*"))


def test_eval_zero_shot_on_mode_is_the_reports_ensemble(setup, tmp_path, capsys):
    """`hf-moe eval zero-shot` (which MoDE's card points to) scores a MoDE model as its own zero-shot does: the
    experts' cosines summed with the task weights of the class names, i.e. the report's `ensemble` column."""
    from hf_moe.evaluation import evaluate_command

    root, experts, bert, tasks, folders, mode, templates_file = setup
    model = MoDEModel.from_pretrained(mode).eval()
    processor = CLIPProcessor.from_pretrained(mode)
    name = TASKS[0]
    report = evaluate_task(model, processor, folders[name], templates=TEMPLATES, batch_size=BATCH, progress=False)
    results = zero_shot_classification(
        model, processor, folders[name], templates=TEMPLATES, batch_size=BATCH, return_predictions=True, progress=False
    )
    assert results["predictions"] == report.predictions["ensemble"]
    assert results["top1_accuracy"] == report.row["ensemble"]
    assert results["task_weights"] == pytest.approx(report.task_weights.tolist(), abs=1e-6)
    assert report.task_weights.max() - report.task_weights.min() > 1e-3  # the weights decide something
    output = tmp_path / "eval.json"
    command = ["zero-shot", "--model", str(mode), "--data", str(folders[name]), "--templates", str(templates_file)]
    written = evaluate_command([*command, "--batch_size", str(BATCH), "--output", str(output)])
    assert written["top1_accuracy"] == results["top1_accuracy"]
    assert written["task_weights"] == results["task_weights"]
