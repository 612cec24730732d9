"""Smoke test of benchmarks/moiie_forward.py at the tiny shape: every worker runs and reports positive figures, the
ratios to dense are taken per round, and a shape too large for the machine is refused before anything is built.
No timing assertions (timings on a shared CPU mean nothing at this size)."""

import contextlib
import io
import json

import pytest

from helpers import script_fixture


TINY = ["--shape", "tiny", "--warmup", "0", "--iters", "1", "--rounds", "1", "--device", "cpu"]


bench = script_fixture("benchmarks/moiie_forward.py")


@pytest.mark.parametrize("worker", ["dense:-", "moiie:grouped_mm"])
def test_worker_reports_both_phases(bench, worker):
    result = bench.measure(bench.parse_args([*TINY, "--_worker", worker]))
    assert result["weights_mib"] > 0 and result["max_rss_mib"] > 0
    for phase in ("train", "decode"):
        assert result[phase]["tokens_per_s"] > 0
        assert result[phase]["peak_memory_mib"] >= 0
    assert result["decode"]["new_tokens"] == bench.SHAPES["tiny"].new_tokens


def test_main_runs_each_configuration_in_a_worker_and_names_the_best_implementation(bench):
    argv = [*TINY, "--variants", "dense", "vanilla", "--experts_implementations", "eager"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        bench.main(argv)
    report = json.loads(stdout.getvalue())
    assert set(report["results"]) == {"dense", "vanilla/eager"}
    for name, result in report["results"].items():
        assert "error" not in result, (name, result)
        for phase in ("train", "decode"):
            assert result[phase]["tokens_per_s"] > 0
            assert result[phase]["speed_vs_dense"] > 0
    assert report["results"]["dense"]["train"]["speed_vs_dense"] == 1.0
    best = report["best_experts_implementation"]["vanilla"]
    assert best["train"]["experts_implementation"] == best["decode"]["experts_implementation"] == "eager"
    assert report["parameters"]["vanilla"] > report["parameters"]["dense"]
    assert set(report["goals"]) == {
        "vanilla_decode_speed_vs_dense >= 0.7",
        "vanilla_train_speed_vs_dense >= 0.6",
        "moiie_decode_speed_vs_dense >= 0.7",
        "moiie_train_speed_vs_dense >= 0.6",
        "met",
    }
    assert report["goals"]["met"] is False  # moiie was not measured


def test_ratios_are_medians_of_per_round_ratios(bench):
    def run(train, decode):
        return {
            "weights_mib": 1.0,
            "train": {"tokens_per_s": train, "peak_memory_mib": 2.0},
            "decode": {"tokens_per_s": decode, "peak_memory_mib": 1.0},
        }

    # The machine is twice as fast in round 2; the ratios of the same round are compared, then their median taken.
    rounds = [
        {"dense": run(100, 10), "moiie/eager": run(50, 8), "moiie/grouped_mm": run(70, 9)},
        {"dense": run(200, 20), "moiie/eager": run(100, 16), "moiie/grouped_mm": run(140, 18)},
        {"dense": run(100, 10), "moiie/eager": run(40, 9), "moiie/grouped_mm": run(70, 9)},
    ]
    summary = bench.summarise(rounds)
    assert summary["moiie/eager"]["train"]["speed_vs_dense"] == pytest.approx(0.5)
    assert summary["moiie/grouped_mm"]["decode"]["speed_vs_dense"] == pytest.approx(0.9)
    assert summary["moiie/eager"]["train"]["peak_memory_vs_dense"] == pytest.approx(1.0)
    best = bench.best_implementations(summary, ["dense", "moiie"], ["eager", "grouped_mm"])
    assert best["moiie"]["train"]["experts_implementation"] == "grouped_mm"
    assert best["moiie"]["train"]["speed_vs_dense"] == pytest.approx(0.7)
    goals = bench.goals({**best, "vanilla": best["moiie"]})
    assert goals["moiie_train_speed_vs_dense >= 0.6"] == pytest.approx(0.7) and goals["met"] is True


def test_worker_error_is_reported_not_raised(bench):
    rounds = [{"dense": {"error": "exit status -9"}, "moiie/eager": {"error": "exit status 1"}}]
    assert bench.summarise(rounds) == {"dense": {"error": "exit status -9"}, "moiie/eager": {"error": "exit status 1"}}


def test_phi3_mini_shape_builds_and_is_refused_without_enough_memory(bench, monkeypatch):
    args = bench.parse_args(["--shape", "phi3-mini", "--device", "cpu", "--variants", "dense", "moiie"])
    shape = bench.selected_shape(args)
    config = bench.build_config(shape, "moiie")
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (3072, 32)
    assert config.vision_config.hidden_size == 1152 and shape.image_tokens == 729
    assert config.moe_layers == list(range(1, 32, 2)) and config.num_local_experts == 4
    monkeypatch.setattr(bench, "free_memory", lambda device: 16 * 2**30)
    with pytest.raises(SystemExit, match=r"--shape phi3-mini needs at least \d+\.\d GiB on cpu .* only 16\.0 GiB"):
        bench.memory_check(shape, args.variants, args)
