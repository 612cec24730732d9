"""`hf-moe analyze-routing` on MoIIE and MoDE models, through the CLI: routing.json holds what the model itself routes
(MoIIE: the top-k experts its MoE blocks pick for each non-padding vision / language token, recorded from the blocks
while the model runs sample by sample, unpadded; MoDE: the task weights of the class names' clustering embeddings
averaged over the templates, computed with the clustering encoder directly), every PNG decodes and carries its
figure's title, routing.md embeds every figure; bad data and a clusters folder of another model are refused with a
one-line error naming the file, and nothing is written."""

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_mode_build import write_clusters
from test_moiie_training import SAMPLES, toy_model, toy_processor
from transformers import BertModel, BertTokenizer

from hf_moe.cli import main
from hf_moe.evaluation import DEFAULT_TEMPLATES
from hf_moe.mode.build import main as build_main
from hf_moe.mode.routing import read_tasks
from hf_moe.modeling import MoDEModel
from hf_moe.modeling.modeling_moiie import MoIIESparseBlock
from hf_moe.moiie.data import MoIIECollator, load_conversations
from hf_moe.moiie.routing import layer_expert_counts
from hf_moe.task_data import build_task, save_task_folders
from hf_moe.toy import save_toy_clip

from helpers import save_tiny_bert


def analyze(*argv) -> int:
    return main(["analyze-routing", *map(str, argv)])


def error_line(capsys) -> str:
    """The CLI's error: one line (the last of stderr; progress bars may precede it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    assert errors[0].startswith("hf-moe analyze-routing: error: ")
    return errors[0]


def check_figures(output_dir) -> dict:
    """routing.json's figures each have a PNG that decodes and whose "Title" text is the figure's title, and
    routing.md embeds every PNG of the folder."""
    report = json.loads((output_dir / "routing.json").read_text())
    markdown = (output_dir / "routing.md").read_text()
    pngs = sorted(path.name for path in output_dir.glob("*.png"))
    assert pngs == sorted(figure["file"] for figure in report["figures"].values())
    for figure in report["figures"].values():
        with Image.open(output_dir / figure["file"]) as image:
            image.load()  # decodes the whole file
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
            assert image.text["Title"] == figure["title"]
        assert f"![{figure['title']}]({figure['file']})" in markdown
    return report


# ----------------------------------------------------------------------------------------------------------------
# MoIIE
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moiie_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing_moiie")
    images = root / "images"  # not next to the JSON: --image_folder
    images.mkdir()
    for seed, name in enumerate(["seven.png", "three.png"]):
        pixels = np.random.RandomState(seed).randint(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name)
    (root / "data").mkdir()
    (root / "data" / "data.json").write_text(json.dumps(SAMPLES * 2))
    processor = toy_processor()
    folders = {}
    for variant in ("moiie", "vanilla", "modality", "dense"):
        model = toy_model(processor)
        if variant != "moiie":  # vanilla: one router over all experts; modality: none; dense: no experts
            model.config.variant = variant
            torch.manual_seed(0)
            model = type(model)(model.config)
        model.save_pretrained(root / variant)
        processor.save_pretrained(root / variant)
        folders[variant] = root / variant
    return root, folders


@torch.no_grad()
def recorded_choices(model_dir, data, image_folder, dtype=None):
    """Per MoE layer and modality, how many top-k choices of the samples' tokens went to each expert: the
    `top_k_index` each MoE block's `route` returns while the model runs on one sample at a time (no padding), the
    model loaded in `dtype` (default: as saved)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto").eval()
    collator = MoIIECollator(toy_processor())
    dataset = load_conversations(data, image_folder)
    blocks = [module for module in model.modules() if isinstance(module, MoIIESparseBlock)]
    experts = model.config.num_local_experts
    counts = [{"vision": torch.zeros(experts, dtype=torch.long), "language": torch.zeros(experts, dtype=torch.long)}]
    counts = [{key: value.clone() for key, value in counts[0].items()} for _ in blocks]
    for row in dataset:
        batch = collator([row])
        assert batch["attention_mask"].all()
        types = batch["token_type_ids"].reshape(-1)
        for index, block in enumerate(blocks):
            original = block.route

            def route(hidden_states, token_type_ids, _original=original, _index=index, _types=types):
                top_k_index, weights = _original(hidden_states, token_type_ids)
                for modality, mask in (("vision", _types == 1), ("language", _types == 0)):
                    counts[_index][modality] += torch.bincount(top_k_index[mask].reshape(-1), minlength=experts)
                return top_k_index, weights

            block.route = route
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        if dtype is not None and "pixel_values" in inputs:  # text-only samples have none
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        model(**inputs)
        for block in blocks:
            del block.route
    return counts


@pytest.mark.parametrize("variant", ["moiie", "vanilla", "modality"])
def test_moiie_routing_json_is_what_the_model_routes(moiie_inputs, tmp_path, variant):
    root, folders = moiie_inputs
    data, images = root / "data" / "data.json", root / "images"
    out = tmp_path / "out"
    # batch_size 4 pads the text-only and the short samples: padding must not count
    code = analyze("--model", folders[variant], "--data", data, "--image_folder", images, "--output_dir", out,
                   "--batch_size", 4, "--device", "cpu")  # fmt: skip
    assert code == 0
    report = check_figures(out)
    numbers = report["numbers"]
    assert report["model_type"] == "moiie" and report["num_samples"] == len(SAMPLES) * 2
    assert numbers["expert_groups"] == ["vision-only", "shared", "shared", "language-only"]

    expected = recorded_choices(folders[variant], data, images)
    assert [layer["layer"] for layer in numbers["layers"]] == [1, 3]
    for layer, counts in zip(numbers["layers"], expected):
        for modality in ("vision", "language"):
            assert layer[f"{modality}_choices"] == counts[modality].tolist()
            total = counts[modality].sum().item()
            assert layer[f"{modality}_share"] == pytest.approx([c / total for c in counts[modality].tolist()])
        assert layer["vision_tokens"] == 2 * 2 * 4  # 2 images per copy of SAMPLES, 4 tokens each
        if variant == "moiie":  # vision tokens never reach the language expert, language tokens never the vision one
            assert layer["vision_choices"][3] == 0 and layer["language_choices"][0] == 0
        if variant == "modality":  # vision tokens: the vision-only expert; language tokens: the language-only one
            assert layer["vision_choices"] == [16, 0, 0, 0] and layer["language_choices"][:3] == [0, 0, 0]
        bars = report["figures"][f"moiie_layer_{layer['layer']}_modality_share"]
        assert bars["series"] == {"vision tokens": layer["vision_share"], "language tokens": layer["language_share"]}
        assert bars["category_groups"] == ["vision-only", "shared", "shared", "language-only"]
    heatmap = report["figures"]["moiie_modality_share_heatmap"]
    assert heatmap["matrix"] == [layer[f"{m}_share"] for layer in numbers["layers"] for m in ("vision", "language")]
    if variant == "vanilla":  # one router: vision tokens may reach every expert
        assert any(layer["vision_choices"][3] > 0 or layer["language_choices"][0] > 0 for layer in numbers["layers"])


def test_moiie_bfloat16_routing_is_what_the_bf16_model_routes(moiie_inputs, tmp_path):
    """--dtype bfloat16 (bf16 pixels into a bf16 vision tower and decoder): the choices are those the model loaded in
    bf16 makes, sample by sample, and each modality's shares sum to 1."""
    root, folders = moiie_inputs
    data, images = root / "data" / "data.json", root / "images"
    out = tmp_path / "out"
    code = analyze("--model", folders["moiie"], "--data", data, "--image_folder", images, "--output_dir", out,
                   "--batch_size", 1, "--device", "cpu", "--dtype", "bfloat16")  # fmt: skip
    assert code == 0
    numbers = check_figures(out)["numbers"]
    expected = recorded_choices(folders["moiie"], data, images, dtype=torch.bfloat16)
    for layer, counts in zip(numbers["layers"], expected, strict=True):
        for modality in ("vision", "language"):
            assert layer[f"{modality}_choices"] == counts[modality].tolist()
            assert sum(layer[f"{modality}_share"]) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    "variant, vision, language",
    [
        # vision router over [E0 vision-only, E1, E2 shared], language router over [E1, E2, E3 language-only]
        ("moiie", [1, 2, 1, 0], [0, 0, 1, 1]),
        # one router over all four experts, for both modalities
        ("vanilla", [1, 2, 1, 0], [0, 1, 0, 1]),
        # no router: the first vision expert, the first language expert
        ("modality", [2, 0, 0, 0], [0, 0, 0, 1]),
    ],
)
def test_layer_counts_follow_each_variants_routing_and_skip_padding(variant, vision, language):
    config = SimpleNamespace(
        variant=variant, num_vision_experts=1, num_shared_experts=2, num_language_experts=1, num_local_experts=4,
        num_experts_per_tok=2,
    )  # fmt: skip
    token_type_ids = torch.tensor([[1, 1, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 0]])  # the last token is padding: its strong logits must not count
    if variant == "moiie":
        vision_logits = torch.tensor([[3.0, 2, 1], [1, 2, 3], [0, 0, 0], [9, 9, 0]])
        language_logits = torch.tensor([[0.0, 0, 0], [0, 0, 0], [1, 3, 2], [9, 9, 0]])
    else:
        vision_logits = language_logits = torch.tensor([[3.0, 2, 1, 0], [1, 2, 3, 0], [0, 1, 0, 2], [9, 9, 0, 0]])
    counts = layer_expert_counts(config, vision_logits, language_logits, token_type_ids, attention_mask)
    assert counts["vision"].tolist() == vision and counts["language"].tolist() == language


def test_moiie_bad_conversation_json_is_refused_naming_it(moiie_inputs, tmp_path, capsys):
    root, folders = moiie_inputs
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "0", "conversations": [{"from": "human", "value": "hi"}]')  # cut off
    assert analyze("--model", folders["moiie"], "--data", bad, "--output_dir", tmp_path / "out") == 1
    assert str(bad) in error_line(capsys)
    assert not (tmp_path / "out").exists()

    unknown_role = tmp_path / "role.json"
    unknown_role.write_text(json.dumps([{"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}]))
    assert analyze("--model", folders["moiie"], "--data", unknown_role, "--output_dir", tmp_path / "out") == 1
    error = error_line(capsys)
    assert str(unknown_role) in error and "'x'" in error and "robot" in error
    assert not (tmp_path / "out").exists()

    assert (
        analyze("--model", folders["dense"], "--data", root / "data" / "data.json", "--output_dir", tmp_path / "out")
        == 1
    )
    assert "'dense' MoIIE" in error_line(capsys)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# MoDE
# ----------------------------------------------------------------------------------------------------------------

TASKS = ("shapes", "patterns")  # task k's class names are the fine centers of expert k


def bert_embeddings(bert, class_names, templates, dtype=None):
    """`(classes, templates, D)` BERT pooler embeddings of the class prompts, computed here without MoDE's code."""
    tokenizer, encoder = BertTokenizer.from_pretrained(bert), BertModel.from_pretrained(bert, dtype=dtype).eval()
    texts = [template.format(name) for name in class_names for template in templates]
    with torch.no_grad():
        pooled = encoder(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
    return pooled.reshape(len(class_names), len(templates), -1)


@pytest.fixture(scope="module")
def mode_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing_mode")
    experts = [save_toy_clip(root / f"expert{k}", seed=k) for k in range(2)]
    bert = save_tiny_bert(root / "bert")
    tasks = {name: build_task(name, train_per_class=1, test_per_class=1, size=16) for name in TASKS}
    for name, task in tasks.items():
        save_task_folders(task, root / "tasks" / name, "test")
    centers = [
        F.normalize(F.normalize(bert_embeddings(bert, tasks[name].class_names, DEFAULT_TEMPLATES), dim=-1).mean(1))
        for name in TASKS
    ]
    fine_to_coarse = torch.cat([torch.full((len(c),), k) for k, c in enumerate(centers)])
    clusters = write_clusters(
        root / "clusters", num_fine=len(fine_to_coarse), encoder=bert, fine=torch.cat(centers),
        fine_to_coarse=fine_to_coarse,
    )  # fmt: skip
    # Assignments of 7 pairs: 5 in expert 0's clusters, 2 in expert 1's.
    (clusters / "assignments").mkdir()
    fine = [0, 1, 2, 3, 0, 4, 5]
    table = {"key": [f"pair{i}" for i in range(7)], "fine": fine, "coarse": [int(fine_to_coarse[f]) for f in fine]}
    pq.write_table(pa.table(table), clusters / "assignments" / "part-00000.parquet")
    build_main([*map(str, experts), "--clusters", str(clusters), "--output_dir", str(root / "mode")])
    return root, bert, tasks, clusters, root / "mode"


def test_mode_task_weights_fine_clusters_and_pairs(mode_inputs, tmp_path):
    root, bert, tasks, clusters, mode = mode_inputs
    out = tmp_path / "out"
    assert analyze("--model", mode, "--data", root / "tasks", "--clusters", clusters, "--output_dir", out) == 0
    report = check_figures(out)
    numbers = report["numbers"]
    assert set(report["figures"]) == {"mode_task_weights", "mode_fine_clusters_per_expert", "mode_pairs_per_expert"}
    assert list(numbers["tasks"]) == sorted(TASKS)

    model = MoDEModel.from_pretrained(mode).eval()
    for name in TASKS:
        task = numbers["tasks"][name]
        assert task["class_names"] == tasks[name].class_names and task["templates"] == list(DEFAULT_TEMPLATES)
        with torch.no_grad():
            expected = model.task_weights(bert_embeddings(bert, tasks[name].class_names, DEFAULT_TEMPLATES))
        assert task["task_weights"] == pytest.approx(expected.tolist(), abs=1e-5)
        # The fixture's centers make each task lean on its own expert.
        assert max(range(2), key=lambda k: task["task_weights"][k]) == TASKS.index(name)
    heatmap = report["figures"]["mode_task_weights"]
    assert heatmap["column_labels"] == sorted(TASKS) and heatmap["row_labels"] == ["expert 0", "expert 1"]
    assert heatmap["matrix"] == [[numbers["tasks"][t]["task_weights"][k] for t in sorted(TASKS)] for k in range(2)]

    classes = [len(tasks[name].class_names) for name in TASKS]
    assert numbers["fine_clusters_per_expert"] == classes
    assert report["figures"]["mode_fine_clusters_per_expert"]["series"] == {"fine clusters": classes}
    assert numbers["pairs_per_expert"] == [5, 2]
    assert report["figures"]["mode_pairs_per_expert"]["series"] == {"image-text pairs": [5, 2]}


def test_mode_class_names_file_single_folder_and_no_clusters(mode_inputs, tmp_path):
    root, bert, tasks, clusters, mode = mode_inputs
    names = tmp_path / "names.json"
    templates = ["a {}.", "the {} again."]
    names.write_text(json.dumps({"colours": {"class_names": ["red", "blue"], "templates": templates}}))
    out = tmp_path / "out"
    # a single class folder is one task, named after it; --class_names adds a task with its own templates
    assert analyze("--model", mode, "--data", root / "tasks" / "shapes", "--class_names", names,
                   "--output_dir", out) == 0  # fmt: skip
    report = check_figures(out)
    numbers = report["numbers"]
    assert list(numbers["tasks"]) == ["shapes", "colours"]
    assert numbers["tasks"]["colours"]["templates"] == templates
    model = MoDEModel.from_pretrained(mode).eval()
    with torch.no_grad():
        expected = model.task_weights(bert_embeddings(bert, ["red", "blue"], templates))
    assert numbers["tasks"]["colours"]["task_weights"] == pytest.approx(expected.tolist(), abs=1e-5)
    # without --clusters: no pairs figure, and routing.md says how to get it
    assert "mode_pairs_per_expert" not in report["figures"] and numbers["pairs_per_expert"] is None
    assert "--clusters" in (out / "routing.md").read_text()


def test_mode_bfloat16_task_weights_are_the_bf16_models_own(mode_inputs, tmp_path):
    root, bert, tasks, clusters, mode = mode_inputs
    runs = {}
    for dtype in ("bfloat16", "float32"):
        out = tmp_path / dtype
        assert analyze("--model", mode, "--data", root / "tasks", "--clusters", clusters, "--output_dir", out,
                       "--dtype", dtype, "--device", "cpu") == 0  # fmt: skip
        runs[dtype] = check_figures(out)["numbers"]
    assert runs["bfloat16"]["pairs_per_expert"] == runs["float32"]["pairs_per_expert"] == [5, 2]
    for name in TASKS:
        weights = runs["bfloat16"]["tasks"][name]["task_weights"]
        assert sum(weights) == pytest.approx(1.0, abs=1e-6)
        model = MoDEModel.from_pretrained(mode, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            expected = model.task_weights(
                bert_embeddings(bert, tasks[name].class_names, DEFAULT_TEMPLATES, torch.bfloat16)
            )
        assert weights == pytest.approx(expected.float().tolist(), abs=1e-6)


def test_mode_tasks_from_task_folders_split_folders_and_json(tmp_path):
    for task, classes in (("cars", ["audi", "bmw_m3"]), ("pets", ["cat", "dog"])):
        for split in ("train", "test") if task == "cars" else ("",):
            for name in classes:
                folder = tmp_path / "tasks" / task / split / name
                folder.mkdir(parents=True)
                Image.new("RGB", (4, 4)).save(folder / "0.png")
    tasks = read_tasks(tmp_path / "tasks")
    assert {task: spec["class_names"] for task, spec in tasks.items()} == {
        "cars": ["audi", "bmw m3"],  # the test split's class folders, '_' read as a space (as hf-moe eval reads them)
        "pets": ["cat", "dog"],
    }
    assert list(read_tasks(tmp_path / "tasks" / "pets")) == ["pets"]  # one class folder: one task
    assert read_tasks(tmp_path / "tasks" / "cars", split="train")["cars"]["class_names"] == ["audi", "bmw m3"]

    bad = tmp_path / "bad.json"
    for content in ('{"cars": ["audi"', '{"cars": []}', '["audi", "bmw"]', '{"cars": {"names": ["a"]}}'):
        bad.write_text(content)
        with pytest.raises(ValueError, match=str(bad)):
            read_tasks(tmp_path / "tasks", class_names=bad)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_tasks(tmp_path / "missing")


def test_mode_clusters_of_another_model_are_refused_naming_the_file(mode_inputs, tmp_path, capsys):
    root, bert, tasks, clusters, mode = mode_inputs
    num_fine = json.loads((mode / "config.json").read_text())["num_fine_clusters"]
    other = write_clusters(tmp_path / "other", num_fine=num_fine, encoder=bert)  # same counts, other centers
    out = tmp_path / "out"
    assert analyze("--model", mode, "--data", root / "tasks", "--clusters", other, "--output_dir", out) == 1
    assert str(other / "centers.safetensors") in error_line(capsys)
    assert not out.exists()

    smaller = write_clusters(tmp_path / "smaller", num_fine=num_fine - 1, encoder=bert)
    assert analyze("--model", mode, "--data", root / "tasks", "--clusters", smaller, "--output_dir", out) == 1
    assert str(smaller / "clusters.json") in error_line(capsys)
    assert not out.exists()
