"""`hf-moe analyze-routing` (hf_moe/routing_report.py, clip_moe/routing.py, we_moe/routing.py): routing.json holds the
numbers the model's own outputs give on the same inputs (recomputed here independently, with numpy), every PNG decodes
and carries its figure's title, routing.md embeds every PNG, and bad inputs are refused with nothing written."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from hf_moe.cli import main
from hf_moe.evaluation import load_image_dataset
from hf_moe.loading import load_pretrained
from hf_moe.routing_report import Heatmap, RoutingReport, Spread, StackedBars, write_routing_report
from hf_moe.toy_data import save_digit_caption_folder, save_digit_class_folders

from helpers import load_script, save_vision_finetunes


@pytest.fixture(scope="module")
def caption_folder(tmp_path_factory):
    """20 captioned digits with integer labels (metadata.jsonl: file_name, text, label)."""
    return save_digit_caption_folder(tmp_path_factory.mktemp("routing") / "captions", count=20)


@pytest.fixture(scope="module")
def wemoe_dir(toy_clip_dir, tmp_path_factory):
    """A 2-task WEMoE of the toy CLIP (task names digits_a, digits_b) whose routers are randomised, so that the
    weights differ between images and tasks."""
    from hf_moe.conversion import merge_wemoe

    root = tmp_path_factory.mktemp("routing-wemoe")
    finetuned = save_vision_finetunes(toy_clip_dir, root)
    model = merge_wemoe(toy_clip_dir, finetuned, root / "merged", task_names=["digits_a", "digits_b"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".router." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(root / "wemoe")
    AutoProcessor.from_pretrained(toy_clip_dir).save_pretrained(root / "wemoe")
    return root / "wemoe"


@pytest.fixture(scope="module")
def task_root(tmp_path_factory):
    """A folder of two task folders, one named like a stored task up to case and punctuation (Digits-B)."""
    root = tmp_path_factory.mktemp("routing-tasks") / "tasks"
    save_digit_class_folders(root / "digits_a", 12)
    save_digit_class_folders(root / "Digits-B", 10, 32, 40)
    return root


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _numpy_counts(logits: np.ndarray, top_k: int, keep: np.ndarray) -> np.ndarray:
    """Per-expert selection counts of the kept tokens (logits `(tokens, experts)`, keep `(tokens,)` of 0/1)."""
    counts = np.zeros(logits.shape[1])
    chosen = np.argsort(-_softmax(logits), axis=1, kind="stable")[:, :top_k]
    for token, experts in enumerate(chosen):
        if keep[token]:
            np.add.at(counts, experts, 1)
    return counts


def check_figures(out: dict, folder):
    """Each PNG decodes and its title metadata equals the figure's and routing.json's title; routing.md embeds it."""
    markdown = (folder / "routing.md").read_text()
    pngs = sorted(path.name for path in folder.glob("*.png"))
    assert pngs == sorted(entry["file"] for entry in out["figures"].values())
    for name, entry in out["figures"].items():
        image = Image.open(folder / entry["file"])
        image.load()  # decodes the whole file
        assert image.size[0] > 100 and image.size[1] > 100
        assert image.text["Title"] == entry["title"]
        assert f"![{entry['title']}]({entry['file']})" in markdown
        assert entry["file"] == f"{name}.png"
    assert f"`{out['data']}`" in markdown and f"`{out['model']}`" in markdown


# ---- CLIP-MoE ----------------------------------------------------------------------------------------------------


def test_clip_moe_routing_json_is_the_models_own_routing(upcycled_dir, caption_folder, tmp_path):
    out_dir = tmp_path / "routing"
    argv = ["analyze-routing", "--model", str(upcycled_dir), "--data", str(caption_folder)]
    assert main([*argv, "--output_dir", str(out_dir), "--batch_size", "7", "--device", "cpu"]) == 0
    out = json.loads((out_dir / "routing.json").read_text())
    assert out["model_type"] == "clip_moe" and out["num_samples"] == 20

    # Recompute from the model's own router logits, image by image and caption by caption.
    model = load_pretrained(upcycled_dir).eval()
    processor = AutoProcessor.from_pretrained(upcycled_dir)
    dataset = load_image_dataset(str(caption_folder))
    labels = [str(label) for label in dataset["label"]]
    classes = sorted(set(labels), key=int)
    config = model.config
    expected = {}
    for tower in ("vision", "text"):
        cfg = getattr(config, f"{tower}_config")
        blocks, experts = len(cfg.moe_layer_indices()), cfg.num_local_experts
        per_class = np.zeros((blocks, len(classes), experts))
        for row in range(len(dataset)):
            with torch.no_grad():
                if tower == "vision":
                    pixels = processor.image_processor(images=dataset[row]["image"].convert("RGB"), return_tensors="pt")
                    logits = model.vision_model(**pixels, output_router_logits=True).router_logits
                    keep = np.ones(logits[0].shape[0])
                else:
                    # Padded to a longer length than the batch needs: padding must not count.
                    tokens = processor.tokenizer([dataset[row]["text"]], padding="max_length", max_length=20)
                    tokens = {key: torch.tensor(value) for key, value in tokens.items()}
                    logits = model.text_model(**tokens, output_router_logits=True).router_logits
                    keep = tokens["attention_mask"][0].numpy()
            for block, block_logits in enumerate(logits):
                counts = _numpy_counts(block_logits.numpy().astype(np.float64), cfg.num_experts_per_tok, keep)
                per_class[block, classes.index(labels[row])] += counts
        totals = per_class.sum(axis=1)
        expected[tower] = (totals / totals.sum(axis=1, keepdims=True), per_class / per_class.sum(-1, keepdims=True))

    towers = out["numbers"]["towers"]
    assert set(towers) == {"vision", "text"}
    for tower, (shares, class_shares) in expected.items():
        entry = towers[tower]
        assert entry["class_names"] == classes
        np.testing.assert_allclose(entry["expert_shares"], shares, atol=1e-9)
        np.testing.assert_allclose(entry["class_expert_shares"], class_shares, atol=1e-9)
        ratios = [max(row) / min(row) for row in shares]
        np.testing.assert_allclose(entry["balance_ratio"], ratios, rtol=1e-9)
        figure = out["figures"][f"clip_moe_{tower}_expert_share"]
        np.testing.assert_allclose(figure["matrix"], shares, atol=1e-9)
        assert f"{min(ratios):.2f} to {max(ratios):.2f}" in figure["title"]
        # Default: the first and last MoE block get a classes x experts figure.
        for block in (0, 1):
            figure = out["figures"][f"clip_moe_{tower}_block{block}_class_expert_share"]
            np.testing.assert_allclose(figure["matrix"], class_shares[block], atol=1e-9)
            assert figure["row_labels"] == classes
    check_figures(out, out_dir)


def test_clip_moe_class_folders_route_the_vision_tower_only(upcycled_dir, tmp_path):
    data = save_digit_class_folders(tmp_path / "classes", 24)
    out_dir = tmp_path / "out"
    argv = ["analyze-routing", "--model", str(upcycled_dir), "--data", str(data), "--output_dir", str(out_dir)]
    assert main([*argv, "--max_samples", "1", "--blocks", "1"]) == 0
    out = json.loads((out_dir / "routing.json").read_text())
    vision = out["numbers"]["towers"]["vision"]
    assert list(out["numbers"]["towers"]) == ["vision"]  # no captions: no text tower
    assert vision["class_names"] == sorted(path.name for path in data.iterdir())
    assert out["num_samples"] == vision["num_samples"] == 10  # --max_samples 1: one image per class
    assert sorted(out["figures"]) == ["clip_moe_vision_block1_class_expert_share", "clip_moe_vision_expert_share"]
    check_figures(out, out_dir)


# ---- WEMoE -------------------------------------------------------------------------------------------------------


def test_wemoe_routing_json_is_the_models_own_routing(wemoe_dir, task_root, tmp_path):
    out_dir = tmp_path / "routing"
    argv = ["analyze-routing", "--model", str(wemoe_dir), "--data", str(task_root), "--output_dir", str(out_dir)]
    assert main([*argv, "--batch_size", "5"]) == 0
    out = json.loads((out_dir / "routing.json").read_text())
    numbers = out["numbers"]
    assert numbers["data_tasks"] == ["Digits-B", "digits_a"] and numbers["task_vectors"] == ["digits_a", "digits_b"]
    assert numbers["data_task_vector"] == {"Digits-B": "digits_b", "digits_a": "digits_a"}

    model = load_pretrained(wemoe_dir).eval()
    processor = AutoProcessor.from_pretrained(wemoe_dir)
    per_task = {}
    for task in numbers["data_tasks"]:
        dataset = load_image_dataset(str(task_root / task))
        pixels = processor.image_processor(images=[image.convert("RGB") for image in dataset["image"]])
        with torch.no_grad():
            weights = model.vision_model(
                pixel_values=torch.tensor(np.stack(pixels["pixel_values"])), output_routing_weights=True
            ).routing_weights
        per_task[task] = np.stack([block.numpy() for block in weights], axis=1).astype(np.float64)  # (n, blocks, T)
    blocks = numbers["blocks"]
    for position, block in enumerate(blocks):
        means = [per_task[task][:, position, :].mean(axis=0) for task in numbers["data_tasks"]]
        np.testing.assert_allclose(numbers["mean_weights"][position], means, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            out["figures"][f"we_moe_block{block}_task_routing"]["matrix"], means, rtol=1e-5, atol=1e-5
        )
        spread = out["figures"][f"we_moe_block{block}_weight_spread"]
        assert spread["positions"] == ["digits_a", "digits_b"]
        for task in numbers["data_tasks"]:
            for vector in range(2):
                np.testing.assert_allclose(
                    spread["groups"][task][vector], per_task[task][:, position, vector], rtol=1e-5, atol=1e-5
                )
    overall = [per_task[task].mean(axis=(0, 1)) for task in numbers["data_tasks"]]
    np.testing.assert_allclose(out["figures"]["we_moe_task_routing"]["matrix"], overall, rtol=1e-5, atol=1e-5)

    # Own task's vector largest: Digits-B's images against vector 1 (digits_b), digits_a's against vector 0.
    own = {"Digits-B": 1, "digits_a": 0}
    hits = [np.argmax(sample.mean(axis=0)) == own[task] for task in own for sample in per_task[task]]
    assert numbers["own_task_accuracy"]["all_blocks"] == pytest.approx(np.mean(hits))
    hits = [
        [np.argmax(sample[b]) == own[task] for b in range(len(blocks))] for task in own for sample in per_task[task]
    ]
    np.testing.assert_allclose(numbers["own_task_accuracy"]["per_block"], np.mean(hits, axis=0))
    assert (
        f"{np.mean([np.argmax(s.mean(0)) == own[t] for t in own for s in per_task[t]]):.0%}"
        in (out["figures"]["we_moe_task_routing"]["title"])
    )
    check_figures(out, out_dir)


def test_wemoe_one_class_folder_without_stored_names_gets_no_own_task_number(wemoe_dir, tmp_path):
    data = save_digit_class_folders(tmp_path / "svhn", 12)
    out_dir = tmp_path / "out"
    argv = ["analyze-routing", "--model", str(wemoe_dir), "--data", str(data), "--output_dir", str(out_dir)]
    assert main(argv) == 0
    numbers = json.loads((out_dir / "routing.json").read_text())["numbers"]
    assert numbers["data_tasks"] == ["svhn"] and numbers["own_task_accuracy"] is None
    assert numbers["nearest_centroid_accuracy"] is None  # one data task: nothing to separate


def test_separation_numbers_on_handmade_weights():
    from hf_moe.we_moe.routing import mean_weights, nearest_centroid_accuracy, own_task_accuracy

    # 3 samples, 2 blocks, 2 task vectors; samples 0, 1 are data task 0 (own vector 1), sample 2 data task 1.
    weights = torch.tensor(
        [[[0.1, 0.9], [0.8, 0.2]], [[0.2, 0.3], [0.1, 0.5]], [[0.7, 0.1], [0.6, 0.0]]], dtype=torch.float64
    )
    means = mean_weights(weights, [0, 0, 1], 2)
    np.testing.assert_allclose(means, [[[0.15, 0.6], [0.7, 0.1]], [[0.45, 0.35], [0.6, 0.0]]])  # [block][task]
    own = own_task_accuracy(weights, [1, 1, 0])
    assert own["per_block"] == pytest.approx([1.0, 2 / 3]) and own["all_blocks"] == pytest.approx(1.0)
    assert own_task_accuracy(weights, [None, None, None]) is None
    assert nearest_centroid_accuracy(weights, [0, 0, 1], 2) == pytest.approx(1.0)


# ---- pure CLIP-MoE functions and the report writer ---------------------------------------------------------------


def test_selection_counts_take_the_top_k_and_skip_padding():
    from hf_moe.clip_moe.routing import class_shares, expert_shares, selection_counts

    # 2 samples x 3 tokens, 3 experts, top-2; the last token of sample 1 is padding.
    logits = torch.tensor(
        [[3.0, 2.0, 1.0], [0.0, 5.0, 4.0], [1.0, 0.0, 2.0], [9.0, 0.0, 8.0], [0.0, 1.0, 2.0], [7.0, 8.0, 9.0]]
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    counts = selection_counts((logits, logits.flip(-1)), top_k=2, num_experts=3, batch_size=2, attention_mask=mask)
    assert counts.shape == (2, 2, 3)
    assert counts[0, 0].tolist() == [2, 2, 2] and counts[1, 0].tolist() == [1, 1, 2]
    assert counts[1, 1].tolist() == [2, 1, 1]
    shares = expert_shares(counts)
    assert shares[0].tolist() == pytest.approx([3 / 10, 3 / 10, 4 / 10])
    per_class = class_shares(counts, [1, 0], 3)  # (blocks, classes, experts); class 2 has no sample
    assert per_class.shape == (2, 3, 3)
    assert per_class[0, 0].tolist() == pytest.approx([0.25, 0.25, 0.5])
    assert per_class[0, 2].tolist() == [0, 0, 0]


def test_report_is_written_atomically_with_titles_in_the_pngs(tmp_path, monkeypatch):
    import hf_moe.routing_report as routing_report

    figures = [
        Heatmap("heat", "A heatmap", [[0.1, 0.2], [0.3, 0.4]], ["a", "b"], ["x", "y"], "col", "row", "Caption."),
        StackedBars(
            "bars", "Bars", ["e0", "e1"], {"vision": [0.2, 0.5], "text": [0.8, 0.5]}, "e", "share", "", ["v", "s"]
        ),
        Spread("spread", "A spread", ["t0", "t1"], {"d0": [[1.0, 2.0], [0.5]], "d1": [[3.0], [1.0, 1.5]]}, "t", "w"),
    ]
    report = RoutingReport("m", "clip_moe", "data/", "two things", 3, {"ratio": float("inf")}, figures, ["A note."])
    out_dir = write_routing_report(report, tmp_path / "out")
    out = json.loads((out_dir / "routing.json").read_text())
    assert out["numbers"] == {"ratio": "inf"}
    assert out["figures"]["bars"]["kind"] == "stacked_bars" and out["figures"]["bars"]["category_groups"] == ["v", "s"]
    check_figures(out, out_dir)
    assert "A note." in (out_dir / "routing.md").read_text() and "Caption." in (out_dir / "routing.md").read_text()

    # A failure while drawing leaves nothing behind; a non-empty folder is refused without overwrite.
    calls = []

    def failing(figure, path):
        calls.append(figure.name)
        if len(calls) == 2:
            raise RuntimeError("drawing failed")
        return original(figure, path)

    original = routing_report.draw_figure
    monkeypatch.setattr(routing_report, "draw_figure", failing)
    with pytest.raises(RuntimeError):
        write_routing_report(report, tmp_path / "new")
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        write_routing_report(report, out_dir)


# ---- errors ------------------------------------------------------------------------------------------------------


def test_dense_model_is_refused_in_one_line_naming_its_model_type(toy_clip_dir, caption_folder, tmp_path, capsys):
    out_dir = tmp_path / "out"
    argv = ["analyze-routing", "--model", str(toy_clip_dir), "--data", str(caption_folder)]
    assert main([*argv, "--output_dir", str(out_dir)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "'clip'" in error and all(family in error for family in ("CLIP-MoE", "WEMoE", "MoIIE", "MoDE"))
    assert not out_dir.exists()


def test_missing_data_and_non_empty_output_are_refused_writing_nothing(upcycled_dir, wemoe_dir, tmp_path, capsys):
    for model in (upcycled_dir, wemoe_dir):
        out_dir = tmp_path / f"out-{model.name}"
        argv = ["analyze-routing", "--model", str(model), "--data", str(tmp_path / "nowhere")]
        assert main([*argv, "--output_dir", str(out_dir)]) == 1
        assert "nowhere" in capsys.readouterr().err and not out_dir.exists()

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    argv = ["analyze-routing", "--model", str(upcycled_dir), "--data", str(tmp_path), "--output_dir", str(occupied)]
    assert main(argv) == 1
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert [path.name for path in occupied.iterdir()] == ["keep.txt"]


# ---- bfloat16 ----------------------------------------------------------------------------------------------------


def test_clip_moe_bfloat16_routing_is_the_bf16_models_own(upcycled_dir, tmp_path):
    """--dtype bfloat16: the shares are those of the model loaded in bf16, image by image (bf16 pixels, bf16 router
    logits, softmax and top-k as the router computes them)."""
    data = save_digit_class_folders(tmp_path / "classes", 10)
    out_dir = tmp_path / "out"
    argv = ["analyze-routing", "--model", str(upcycled_dir), "--data", str(data), "--output_dir", str(out_dir)]
    assert main([*argv, "--dtype", "bfloat16", "--batch_size", "1", "--device", "cpu"]) == 0
    out = json.loads((out_dir / "routing.json").read_text())
    vision = out["numbers"]["towers"]["vision"]

    model = load_pretrained(upcycled_dir, dtype=torch.bfloat16).eval()
    processor = AutoProcessor.from_pretrained(upcycled_dir)
    dataset = load_image_dataset(str(data))
    assert next(model.vision_model.parameters()).dtype == torch.bfloat16
    cfg = model.config.vision_config
    totals = np.zeros((len(cfg.moe_layer_indices()), cfg.num_local_experts))
    for row in range(len(dataset)):
        pixels = processor.image_processor(images=dataset[row]["image"].convert("RGB"), return_tensors="pt")
        with torch.no_grad():
            logits = model.vision_model(
                pixel_values=pixels["pixel_values"].to(torch.bfloat16), output_router_logits=True
            ).router_logits
        for block, block_logits in enumerate(logits):
            keep = np.ones(block_logits.shape[0])
            totals[block] += _numpy_counts(
                block_logits.float().numpy().astype(np.float64), cfg.num_experts_per_tok, keep
            )
    np.testing.assert_allclose(vision["expert_shares"], totals / totals.sum(axis=1, keepdims=True), atol=1e-9)
    np.testing.assert_allclose(np.sum(vision["expert_shares"], axis=1), 1.0, atol=1e-9)
    check_figures(out, out_dir)


def test_wemoe_bfloat16_routing_is_the_bf16_models_own(wemoe_dir, task_root, tmp_path):
    """--dtype bfloat16: the mean weights are those of the model loaded in bf16, image by image, and within bf16
    precision of the fp32 run's."""
    runs = {}
    for dtype in ("bfloat16", "float32"):
        out_dir = tmp_path / dtype
        argv = ["analyze-routing", "--model", str(wemoe_dir), "--data", str(task_root), "--output_dir", str(out_dir)]
        assert main([*argv, "--dtype", dtype, "--batch_size", "1", "--device", "cpu"]) == 0
        runs[dtype] = json.loads((out_dir / "routing.json").read_text())
    numbers = runs["bfloat16"]["numbers"]

    model = load_pretrained(wemoe_dir, dtype=torch.bfloat16).eval()
    assert next(model.vision_model.parameters()).dtype == torch.bfloat16
    processor = AutoProcessor.from_pretrained(wemoe_dir)
    for task_index, task in enumerate(numbers["data_tasks"]):
        dataset = load_image_dataset(str(task_root / task))
        samples = []
        for row in range(len(dataset)):
            pixels = processor.image_processor(images=dataset[row]["image"].convert("RGB"), return_tensors="pt")
            with torch.no_grad():
                weights = model.vision_model(
                    pixel_values=pixels["pixel_values"].to(torch.bfloat16), output_routing_weights=True
                ).routing_weights
            samples.append(np.stack([block[0].float().numpy() for block in weights]).astype(np.float64))
        means = np.mean(samples, axis=0)  # (blocks, task vectors)
        np.testing.assert_allclose(np.asarray(numbers["mean_weights"])[:, task_index], means, atol=1e-9)
    np.testing.assert_allclose(
        numbers["mean_weights"], runs["float32"]["numbers"]["mean_weights"], atol=5e-2, rtol=5e-2
    )


# ---- benchmarks/routing_analysis.py ----------------------------------------------------------------------------


def test_routing_benchmark_runs_the_command_and_checks_its_json(tmp_path, capsys):
    """Smoke test of the benchmark at the tiny shape (one case, one dtype): the command runs in its own process and
    the report holds its measurement and a passing check; the check flags a share row that does not sum to 1."""
    bench = load_script("benchmarks/routing_analysis.py", "routing_analysis_benchmark")
    bench.main(["--shape", "tiny", "--cases", "wemoe_b32_8", "--dtypes", "float32", "--samples", "4",
                "--skip_baseline", "--work_dir", str(tmp_path / "work"),
                "--conversion_work_dir", str(tmp_path / "conversion")])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    run = report["cases"]["wemoe_b32_8"]["float32"]
    assert report["all_ok"] and run["ok"] and run["returncode"] == 0, run
    assert run["num_samples"] == 4 and run["peak_rss_bytes"] > 0 and run["samples_per_s"] > 0
    assert run["arrays_checked"]["mean_weights"] == [2, 2, 8]  # blocks x data tasks x task vectors
    assert "we_moe_task_routing.png" in run["figures"]

    checker = bench.Checker()
    checker.array("shares", [[0.5, 0.5], [0.5, 0.4]], [2, 2], sums_to_one=True)
    checker.array("weights", [[1.0, 2.0]], [2, 2])
    assert len(checker.problems) == 2 and "sums to 1" in checker.problems[0] and "shape" in checker.problems[1]
