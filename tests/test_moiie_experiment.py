"""examples/moiie/experiment_digits.py at its --quick size: every variant trains and is evaluated on every question
kind, the routing shares are computed from the routers (each modality's shares sum to 1 per layer; under MoIIE
vision tokens never reach the language-only expert nor language tokens the vision-only one), the JSON and the
markdown table agree, and the aggregation over seeds is right."""

import json
import math

import pytest

from helpers import script_fixture


experiment = script_fixture("examples/moiie/experiment_digits.py", "experiment_moiie_digits")


def test_quick_run_trains_every_variant_and_reports_accuracy_and_routing(experiment, tmp_path, capsys):
    output = tmp_path / "results.json"
    experiment.main(["--quick", "--seeds", "0", "--output", str(output), "--work_dir", str(tmp_path / "work")])
    result = json.loads(output.read_text())
    assert result["settings"]["quick"] and result["num_held_out_images"] == 20

    runs = result["per_seed"]["0"]
    assert set(runs) == set(experiment.VARIANTS)
    for variant, run in runs.items():
        accuracy = run["accuracy"]
        assert set(accuracy) == set(experiment.KINDS)
        assert all(0.0 <= value <= 1.0 for value in accuracy.values())
        assert accuracy["mean"] == pytest.approx(sum(accuracy[k] for k in ("digit", "even", "greater")) / 3)
        # each variant went through upcycling, stage 1 and stage 2, and its stage-2 model is the one evaluated
        work = tmp_path / "work" / "seed0" / variant
        for stage in ("upcycled", "stage1", "stage2"):
            assert (work / stage / "model.safetensors").is_file(), (variant, stage)
        config = json.loads((work / "stage2" / "config.json").read_text())
        assert config["variant"] == variant
    assert (tmp_path / "work" / "seed0" / "parts" / "phi3" / "model.safetensors").is_file()

    assert set(result["summary"]["routing"]) == {"vanilla", "moiie"}
    for variant in ("vanilla", "moiie"):
        routing = runs[variant]["routing"]
        for modality in ("vision", "language"):
            layers = routing[modality]
            assert len(layers) == 2 and all(len(shares) == 4 for shares in layers)  # MoE layers 1 and 3
            for shares in layers:
                assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0
    moiie = runs["moiie"]["routing"]
    assert all(shares[3] == 0 and shares[0] > 0 for shares in moiie["vision"])
    assert all(shares[0] == 0 and shares[3] > 0 for shares in moiie["language"])
    # vanilla routes both modalities over all experts: some token of each modality reaches a shared expert
    assert any(shares[1] + shares[2] > 0 for shares in runs["vanilla"]["routing"]["vision"])

    table = result["table"]
    row = next(line for line in table.splitlines() if line.startswith(f"| {experiment.VARIANTS['moiie']} |"))
    assert f"| {runs['moiie']['accuracy']['digit']:.3f} |" in row
    assert table in capsys.readouterr().out


def test_summary_is_mean_and_sample_std_over_seeds(experiment):
    def run(accuracy, vision_share):
        shares = [vision_share, 1 - vision_share, 0.0, 0.0]
        routing = {"vision": [shares, shares], "language": [[0, 0.5, 0.5, 0], [0, 0.5, 0.5, 0]]}
        accuracies = dict.fromkeys(experiment.KINDS, accuracy)
        return {v: {"accuracy": accuracies, "routing": routing} for v in experiment.VARIANTS}

    summary = experiment.summarize({0: run(0.5, 0.2), 1: run(0.7, 0.4)})
    stats = summary["accuracy"]["moiie"]["digit"]
    assert stats["mean"] == pytest.approx(0.6) and stats["std"] == pytest.approx(math.sqrt(0.02))
    vision = summary["routing"]["moiie"]["vision"]
    assert vision[0]["mean"] == pytest.approx(0.3) and vision[1]["mean"] == pytest.approx(0.7)
    assert experiment.summarize({0: run(0.5, 0.2)})["accuracy"]["dense"]["even"]["std"] is None


def test_bad_settings_are_refused(experiment):
    with pytest.raises(ValueError, match="train_images"):
        experiment.ExperimentArguments(train_images=1600)
    with pytest.raises(ValueError, match="seed"):
        experiment.ExperimentArguments(seeds=[])


def test_digit_questions_are_answered_from_the_labels(tmp_path):
    from hf_moe.moiie.toy import digit_labels, save_digit_questions, toy_processor
    from hf_moe.toy_data import DIGIT_NAMES

    indices = [0, 1, 2, 3, 4, 5]
    path = save_digit_questions(tmp_path / "q.json", tmp_path / "img", indices, ["digit", "even"], text_only_per_kind=2)
    samples = json.loads(path.read_text())
    assert len(samples) == 6 * 2 + 2 * 2 and len({s["id"] for s in samples}) == len(samples)
    by_image = {}
    for sample in samples:
        question, answer = (turn["value"] for turn in sample["conversations"])
        if "image" in sample:
            assert (tmp_path / "img" / sample["image"]).is_file()
            by_image.setdefault(sample["image"], {})[question.split("\n")[1]] = answer
    assert len(by_image) == 6
    for index, label in zip(indices, digit_labels(indices)):
        answers = next(a for name, a in by_image.items() if name.startswith(f"digit_{index:04d}"))
        assert answers == {"what digit is this ?": DIGIT_NAMES[label], "is it even ?": "no" if label % 2 else "yes"}
    # every word of every question and answer is one token of the toy tokenizer
    tokenizer = toy_processor().tokenizer
    for sample in samples:
        for turn in sample["conversations"]:
            text = turn["value"].replace("<image>\n", "")
            assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"], text
    with pytest.raises(ValueError, match="colour"):
        save_digit_questions(tmp_path / "bad.json", tmp_path / "img", indices, ["colour"])
    assert not (tmp_path / "bad.json").exists()
