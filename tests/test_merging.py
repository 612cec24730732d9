"""hf_moe.merging: each method against a hand-computed reference, TIES against a plain loop, the registry, refusals
of mismatched inputs with nothing written, and merged folders that load as ordinary CLIP models."""

import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import CLIPModel, CLIPVisionModel

from hf_moe import merging
from hf_moe.cli import main
from hf_moe.merging import (
    MERGE_METHODS,
    check_compatible,
    merge_clip_vision,
    merge_state_dicts,
    register_merge_method,
    task_vectors,
)
from hf_moe.toy import save_toy_clip


PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json")


def perturbed_vision_state(base_dir, seed, scale=0.2):
    clip = CLIPModel.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(seed)
    return {
        key: tensor + scale * torch.randn(tensor.shape, generator=generator) if tensor.is_floating_point() else tensor
        for key, tensor in clip.vision_model.state_dict().items()
    }


def save_vision_finetune(base_dir, output_dir, seed, scale=0.2):
    """A vision-only fine-tune of the CLIP in `base_dir` (as the tanganke checkpoints are), with its processor."""
    clip = CLIPModel.from_pretrained(base_dir)
    model = CLIPVisionModel(clip.config.vision_config)
    model.load_state_dict(
        perturbed_vision_state(base_dir, seed, scale) if seed is not None else clip.vision_model.state_dict()
    )
    model.save_pretrained(output_dir)
    for name in PROCESSOR_FILES:
        shutil.copy(base_dir / name, output_dir / name)
    return output_dir


def save_clip_finetune(base_dir, output_dir, seed, scale=0.2):
    """A full CLIPModel fine-tune whose vision tower is perturbed."""
    clip = CLIPModel.from_pretrained(base_dir)
    clip.vision_model.load_state_dict(perturbed_vision_state(base_dir, seed, scale))
    clip.save_pretrained(output_dir)
    for name in PROCESSOR_FILES:
        shutil.copy(base_dir / name, output_dir / name)
    return output_dir


@pytest.fixture(scope="module")
def finetuned_dirs(toy_clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetuned")
    return [save_vision_finetune(toy_clip_dir, root / f"task{i}", seed=i) for i in range(3)]


def vision_state(folder):
    return merging.load_clip_vision_state_dict(folder)


# ------------------------------------------------------------------------------------------ methods, tiny tensors

BASE = {"w": torch.tensor([[1.0, -2.0], [0.5, 0.0]]), "b": torch.tensor([0.0, 1.0]), "n": torch.tensor([3])}
FT = [
    {"w": torch.tensor([[2.0, -2.0], [0.5, 1.0]]), "b": torch.tensor([1.0, 1.0]), "n": torch.tensor([3])},
    {"w": torch.tensor([[0.0, -1.0], [1.5, -3.0]]), "b": torch.tensor([-0.5, 3.0]), "n": torch.tensor([3])},
]


def test_task_vectors_are_differences_and_skip_integer_buffers():
    taus = task_vectors(BASE, FT)
    torch.testing.assert_close(taus[0]["w"], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(taus[1]["b"], torch.tensor([-0.5, 2.0]))
    assert "n" not in taus[0]


def test_average_and_task_arithmetic_match_hand_computed_values():
    avg = merge_state_dicts("average", BASE, FT)
    torch.testing.assert_close(avg["w"], torch.tensor([[1.0, -1.5], [1.0, -1.0]]))
    torch.testing.assert_close(avg["b"], torch.tensor([0.25, 2.0]))
    assert torch.equal(avg["n"], BASE["n"])
    ta = merge_state_dicts("task_arithmetic", BASE, FT)  # lambda 0.3: tau sum w = [[0,1],[1,-2]], b = [0.5, 2]
    torch.testing.assert_close(ta["w"], torch.tensor([[1.0, -1.7], [0.8, -0.6]]))
    torch.testing.assert_close(ta["b"], torch.tensor([0.15, 1.6]))
    ta1 = merge_state_dicts("task_arithmetic", BASE, FT, scaling=1.0)
    torch.testing.assert_close(ta1["w"], BASE["w"] + torch.tensor([[0.0, 1.0], [1.0, -2.0]]))


def test_ties_matches_hand_computed_values():
    # taus: t0 = w [[1,0],[0,1]] b [1,0];  t1 = w [[-1,1],[1,-3]] b [-0.5,2]. density 0.5 of 6 entries: the
    # threshold is the (int(3) + 1)-th largest magnitude, so t0 keeps its three 1s (the threshold is 0) and t1 keeps
    # -3, 2 and the 1s tied at the threshold |1| (w00, w01, w10). Elected sign by summed mass; w00 sums to 0 and
    # takes the majority of the elected signs (w: 0, +, +, -; b: +, + -> +). Each kept entry has one agreeing
    # value, so the disjoint sum and mean agree here.
    for aggregation in ("sum", "mean"):
        merged = merge_state_dicts("ties", BASE, FT, scaling=1.0, density=0.5, aggregation=aggregation)
        # w00: 1 and -1 -> sum 0 -> majority + -> {1} = 1; w01: 0,1 -> 1; w10: 0,1 -> 1; w11: 1,-3 -> - -> -3
        torch.testing.assert_close(merged["w"], BASE["w"] + torch.tensor([[1.0, 1.0], [1.0, -3.0]]))
        # b0: 1 and (-0.5 trimmed) -> 1; b1: 0 and 2 -> 2
        torch.testing.assert_close(merged["b"], BASE["b"] + torch.tensor([1.0, 2.0]))


def test_ties_keeps_the_references_count_and_sums_by_default():
    # 10 entries, density 0.2: fusion_bench / the TIES repo keep |x| >= the (int(2) + 1) = 3rd largest, 3 entries.
    # t0 = [5, -4, 3, .5, -.1, .2, 1, -2, .3, .4] keeps 5, -4, 3; t1 = [4.5, 6, -2, .1, .2, .3, -5, .4, .5, 1] keeps
    # 4.5, 6, -5. Sums [9.5, 2, 3, 0, 0, 0, -5, 0, 0, 0] elect + + + (majority +) ... - ...; agreeing values:
    # e0 {5, 4.5}, e1 {6} (-4 disagrees), e2 {3}, e6 {-5}.
    base = {"v": torch.zeros(10)}
    finetuned = [
        {"v": torch.tensor([5.0, -4.0, 3.0, 0.5, -0.1, 0.2, 1.0, -2.0, 0.3, 0.4])},
        {"v": torch.tensor([4.5, 6.0, -2.0, 0.1, 0.2, 0.3, -5.0, 0.4, 0.5, 1.0])},
    ]
    summed = torch.tensor([9.5, 6.0, 3.0, 0.0, 0.0, 0.0, -5.0, 0.0, 0.0, 0.0])
    default = merge_state_dicts("ties", base, finetuned, scaling=1.0)  # density 0.2, aggregation sum
    torch.testing.assert_close(default["v"], summed)
    mean = merge_state_dicts("ties", base, finetuned, scaling=1.0, aggregation="mean")
    torch.testing.assert_close(mean["v"], torch.tensor([4.75, 6.0, 3.0, 0.0, 0.0, 0.0, -5.0, 0.0, 0.0, 0.0]))
    assert MERGE_METHODS["ties"].options() == {
        "scaling": 0.3,
        "density": 0.2,
        "trim": "task_vector",
        "aggregation": "sum",
    }
    with pytest.raises(ValueError, match="aggregation must be one of"):
        merge_state_dicts("ties", base, finetuned, aggregation="max")


def test_ties_resolves_a_zero_mass_by_the_majority_sign():
    # Entry 0 sums to 0 (1 - 1); the other entries elect -, -, so entry 0 takes - and keeps -1 (a "sum >= 0 -> +"
    # rule, as peft's, would keep +1).
    base = {"v": torch.zeros(3)}
    finetuned = [{"v": torch.tensor([1.0, -3.0, -2.0])}, {"v": torch.tensor([-1.0, 0.0, 0.0])}]
    merged = merge_state_dicts("ties", base, finetuned, scaling=1.0, density=1.0)
    torch.testing.assert_close(merged["v"], torch.tensor([-1.0, -3.0, -2.0]))


def loop_ties(base, finetuned, scaling, density, aggregation):
    """TIES written out entry by entry: a plain reference (threshold: the (int(density * d) + 1)-th largest)."""
    taus = [{k: ft[k].float() - v.float() for k, v in base.items() if v.is_floating_point()} for ft in finetuned]
    trimmed = []
    for tau in taus:
        flat = sorted((abs(x) for t in tau.values() for x in t.reshape(-1).tolist()), reverse=True)
        threshold = flat[int(density * len(flat))]
        trimmed.append({k: [x if abs(x) >= threshold else 0.0 for x in t.reshape(-1).tolist()] for k, t in tau.items()})
    out = {}
    for key, tensor in base.items():
        if not tensor.is_floating_point():
            out[key] = tensor
            continue
        values = []
        for j in range(tensor.numel()):
            column = [t[key][j] for t in trimmed]
            sign = 1.0 if sum(column) >= 0 else -1.0
            agreeing = [x for x in column if x != 0 and (x > 0) == (sign > 0)]
            values.append(sum(agreeing) / max(1, len(agreeing)) if aggregation == "mean" else sum(agreeing))
        out[key] = tensor + scaling * torch.tensor(values).reshape(tensor.shape)
    return out


def test_ties_equals_a_straightforward_loop():
    generator = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(7, 5, generator=generator), "c": torch.randn(11, generator=generator)}
    finetuned = [{k: v + torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(4)]
    for aggregation in ("sum", "mean"):
        expected = loop_ties(base, finetuned, scaling=0.7, density=0.3, aggregation=aggregation)
        merged = merge_state_dicts("ties", base, finetuned, scaling=0.7, density=0.3, aggregation=aggregation)
        for key in base:
            torch.testing.assert_close(merged[key], expected[key])


def test_ties_per_tensor_trim_uses_each_tensors_top_entries():
    base = {"a": torch.zeros(4), "c": torch.zeros(4)}
    finetuned = [{"a": torch.tensor([10.0, 20.0, 30.0, 40.0]), "c": torch.tensor([1.0, 2.0, 3.0, 4.0])}]
    per_task = merge_state_dicts("ties", base, finetuned, scaling=1.0, density=0.5)
    per_tensor = merge_state_dicts("ties", base, finetuned, scaling=1.0, density=0.5, trim="tensor")
    # Over the whole task vector, the top int(0.5 * 8) + 1 = 5 entries are all of `a` and the 4 of `c`.
    torch.testing.assert_close(per_task["c"], torch.tensor([0.0, 0.0, 0.0, 4.0]))
    torch.testing.assert_close(per_tensor["c"], torch.tensor([0.0, 0.0, 3.0, 4.0]))


def test_registry_accepts_a_new_method_and_checks_options():
    @register_merge_method("scaled_first_test")
    def scaled_first(pretrained, task_vectors, coefficients=(1.0,)):
        """First task vector times a learned coefficient."""
        return merging.add_to_pretrained(pretrained, {k: coefficients[0] * v for k, v in task_vectors[0].items()})

    try:
        merged = merge_state_dicts("scaled_first_test", BASE, FT, coefficients=(2.0,))
        torch.testing.assert_close(merged["w"], BASE["w"] + 2 * (FT[0]["w"] - BASE["w"]))
        assert MERGE_METHODS["scaled_first_test"].description == "First task vector times a learned coefficient."
        with pytest.raises(ValueError, match="already registered"):
            register_merge_method("scaled_first_test", scaled_first)
    finally:
        MERGE_METHODS.pop("scaled_first_test")
    with pytest.raises(ValueError, match="no option 'density'"):
        merge_state_dicts("task_arithmetic", BASE, FT, density=0.2)
    with pytest.raises(ValueError, match="Unknown merge method 'fisher'"):
        merge_state_dicts("fisher", BASE, FT)
    with pytest.raises(ValueError, match="density"):
        merge_state_dicts("ties", BASE, FT, density=0.0)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda sd: sd.pop("b"), "Key b is missing from 'finetuned\\[1\\]'"),
        (lambda sd: sd.update(extra=torch.zeros(1)), "Key extra is in 'finetuned\\[1\\]'"),
        (lambda sd: sd.update(w=torch.zeros(2, 3)), r"w: shape \(2, 3\) in 'finetuned\[1\]' vs \(2, 2\)"),
        (lambda sd: sd.update(n=torch.tensor([4])), "n: the integer buffer differs"),
    ],
)
def test_mismatched_state_dicts_are_refused_naming_the_key(change, match):
    bad = dict(FT[1])
    change(bad)
    with pytest.raises(ValueError, match=match):
        check_compatible(BASE, [FT[0], bad])


# ------------------------------------------------------------------------------------------ CLIP folders


def test_average_of_identical_models_is_the_model(toy_clip_dir, tmp_path):
    copy = save_vision_finetune(toy_clip_dir, tmp_path / "same", seed=None)
    merged = merge_clip_vision("average", toy_clip_dir, [copy, copy], tmp_path / "avg")
    original = CLIPModel.from_pretrained(toy_clip_dir).state_dict()
    for key, tensor in CLIPModel.from_pretrained(tmp_path / "avg").state_dict().items():
        torch.testing.assert_close(tensor, original[key], rtol=0, atol=1e-6)
    assert type(merged).__name__ == "CLIPModel"


@pytest.mark.parametrize("method, options", [("task_arithmetic", {"scaling": 0.5}), ("ties", {"density": 0.3})])
def test_clip_folder_holds_the_merged_vision_tower_and_the_pretrained_text_tower(
    toy_clip_dir, finetuned_dirs, tmp_path, method, options
):
    output = tmp_path / "merged"
    merge_clip_vision(method, toy_clip_dir, finetuned_dirs, output, **options)
    expected = merge_state_dicts(
        method, vision_state(toy_clip_dir), [vision_state(d) for d in finetuned_dirs], **options
    )
    loaded = CLIPModel.from_pretrained(output)
    for key, tensor in loaded.vision_model.state_dict().items():
        torch.testing.assert_close(tensor, expected[key])
    pretrained = CLIPModel.from_pretrained(toy_clip_dir)
    for key, tensor in loaded.text_model.state_dict().items():
        assert torch.equal(tensor, pretrained.text_model.state_dict()[key])
    assert torch.equal(loaded.visual_projection.weight, pretrained.visual_projection.weight)
    assert (output / "processor_config.json").is_file()
    card = ModelCard.load(output / "README.md")
    assert {"merge", method} <= set(card.data.tags)
    assert f"hf-moe merge --method {method}" in card.text and str(finetuned_dirs[2]) in card.text


def test_vision_only_pretrained_gives_a_clip_vision_model_folder(toy_clip_dir, finetuned_dirs, tmp_path):
    pretrained = save_vision_finetune(toy_clip_dir, tmp_path / "pretrained-vision", seed=None)
    output = tmp_path / "merged"
    merge_clip_vision("task_arithmetic", pretrained, finetuned_dirs[:2], output)
    loaded = CLIPVisionModel.from_pretrained(output)
    expected = merge_state_dicts(
        "task_arithmetic", vision_state(pretrained), [vision_state(d) for d in finetuned_dirs[:2]]
    )
    for key, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[key])
    card = ModelCard.load(output / "README.md")
    assert card.data.pipeline_tag == "image-feature-extraction" and "CLIPVisionModel.from_pretrained" in card.text


def test_clip_model_finetunes_are_accepted(toy_clip_dir, tmp_path):
    finetuned = [save_clip_finetune(toy_clip_dir, tmp_path / f"full{i}", seed=10 + i) for i in range(2)]
    merge_clip_vision("average", toy_clip_dir, finetuned, tmp_path / "avg")
    loaded = CLIPModel.from_pretrained(tmp_path / "avg").vision_model.state_dict()
    states = [vision_state(d) for d in finetuned]
    torch.testing.assert_close(
        loaded["encoder.layers.1.mlp.fc1.weight"],
        (states[0]["encoder.layers.1.mlp.fc1.weight"] + states[1]["encoder.layers.1.mlp.fc1.weight"]) / 2,
    )


def test_other_architectures_are_refused_and_nothing_is_written(toy_clip_dir, finetuned_dirs, tmp_path):
    wider = save_toy_clip(tmp_path / "wider", hidden_size=48)
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=r"vision_config.hidden_size is 48 in '.*wider' but 32"):
        merge_clip_vision("average", toy_clip_dir, [finetuned_dirs[0], wider], output)
    assert not output.exists()
    with pytest.raises(ValueError, match="needs at least one"):
        merge_clip_vision("average", toy_clip_dir, [], output)
    assert not output.exists()
    assert not list(tmp_path.glob(".out*"))


def test_merge_command(toy_clip_dir, finetuned_dirs, tmp_path, capsys):
    output = tmp_path / "ties"
    argv = ["merge", "--method", "ties", str(toy_clip_dir), *map(str, finetuned_dirs), "--output_dir", str(output)]
    assert main([*argv, "--scaling", "0.5", "--ties_density", "0.4", "--aggregation", "mean"]) == 0
    assert str(output) in capsys.readouterr().out
    expected = merge_state_dicts(
        "ties",
        vision_state(toy_clip_dir),
        [vision_state(d) for d in finetuned_dirs],
        scaling=0.5,
        density=0.4,
        aggregation="mean",
    )
    loaded = CLIPModel.from_pretrained(output).vision_model.state_dict()
    torch.testing.assert_close(
        loaded["encoder.layers.0.self_attn.q_proj.weight"], expected["encoder.layers.0.self_attn.q_proj.weight"]
    )

    assert (
        main(
            [
                "merge",
                "--method",
                "median",
                str(toy_clip_dir),
                str(finetuned_dirs[0]),
                "--output_dir",
                str(tmp_path / "m"),
            ]
        )
        == 1
    )
    assert "Unknown merge method 'median'" in capsys.readouterr().err
    assert (
        main(
            [
                "merge",
                "--method",
                "average",
                str(toy_clip_dir),
                str(finetuned_dirs[0]),
                "--output_dir",
                str(tmp_path / "m"),
                "--ties_density",
                "0.5",
            ]
        )
        == 1
    )
    assert "no option 'density'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------ registry, DARE, CLI


def test_every_merge_method_is_registered_when_merging_is_imported():
    """AdaMerging used to register itself only when `hf_moe.we_moe.adamerging` happened to be imported."""
    import subprocess
    import sys

    code = "import hf_moe.merging as m; print(' '.join(m.MERGE_METHODS))"
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert names == ["average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "adamerging"]
    assert MERGE_METHODS["adamerging"].trained_by and "hf-moe adamerging" in MERGE_METHODS["adamerging"].trained_by
    assert all(MERGE_METHODS[name].trained_by is None for name in names[:-1])


def dare_reference(base, finetuned, scaling, density, seed, ties=False, block=1 << 16):
    """DARE written out from the paper: a Bernoulli(density) keep mask per entry, kept values divided by density,
    scaled by lambda and summed (or, for DARE-TIES, sign elected by the summed values, + for a zero sum, and the
    agreeing values averaged), with the mask draws of `merging.dare_seed`, made block of entries by block."""
    out = {}
    for key, tensor in base.items():
        if not tensor.is_floating_point():
            out[key] = tensor
            continue
        torch.manual_seed(merging.dare_seed(seed, key))
        taus = [(ft[key].float() - tensor.float()).reshape(-1) for ft in finetuned]
        deltas = []
        for start in range(0, tensor.numel(), block):
            kept = [
                tau[start : start + block]
                * torch.bernoulli(torch.full_like(tau[start : start + block], density))
                / density
                for tau in taus
            ]
            weighted = torch.stack(kept) * scaling
            if ties:
                sign = torch.where(torch.stack(kept).sum(dim=0) >= 0, 1, -1)
                agree = torch.stack(kept).sign() == sign
                deltas.append((weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0))
            else:
                deltas.append(weighted.sum(dim=0))
        out[key] = (tensor.float() + torch.cat(deltas).reshape(tensor.shape)).to(tensor.dtype)
    return out


@pytest.mark.parametrize("block", [1 << 16, 5])
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_the_papers_formula_with_the_same_draws_streamed_or_not(method, block, monkeypatch):
    monkeypatch.setattr(merging, "DARE_BLOCK_ELEMENTS", block)
    generator = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(16, 8, generator=generator), "c": torch.randn(9, generator=generator), "n": BASE["n"]}
    finetuned = [
        {
            k: v + 0.1 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for _ in range(3)
    ]
    state = torch.get_rng_state()
    merged = merge_state_dicts(method, base, finetuned, scaling=0.7, density=0.4, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the masks' generator is forked, the caller's left alone
    expected = dare_reference(base, finetuned, 0.7, 0.4, 3, ties=method == "dare_ties", block=block)
    for key in base:
        assert torch.equal(merged[key], expected[key]), key
    # Per-tensor seeds: streamed in another order, the same tensors; another seed, other masks.
    streamed = merging.streamed_merge(
        method, merging.StateDictSource(base, finetuned), scaling=0.7, density=0.4, seed=3
    )
    for key in ["c", "a"]:
        assert torch.equal(streamed(key), merged[key])
    assert not torch.equal(merge_state_dicts(method, base, finetuned, density=0.4, seed=4)["a"], merged["a"])
    # density 1 keeps every entry: DARE is then task arithmetic (to rounding: peft scales before summing).
    if method == "dare_linear":
        torch.testing.assert_close(
            merge_state_dicts(method, base, finetuned, density=1.0)["a"],
            merge_state_dicts("task_arithmetic", base, finetuned)["a"],
        )
    with pytest.raises(ValueError, match="density"):
        merge_state_dicts(method, base, finetuned, density=0.0)


def test_merge_command_flags_come_from_the_methods_signatures(toy_clip_dir, finetuned_dirs, tmp_path, capsys):
    from transformers import HfArgumentParser

    @register_merge_method("scaled_mean_test", per_tensor=True)
    def scaled_mean(pretrained, task_vectors, beta: float = 1.0):
        """beta times the mean task vector."""
        return merging.add_to_pretrained(
            pretrained, {k: beta * sum(tv[k] for tv in task_vectors) / len(task_vectors) for k in task_vectors[0]}
        )

    base = [str(toy_clip_dir), str(finetuned_dirs[0]), str(finetuned_dirs[1])]
    try:
        output = tmp_path / "scaled"
        assert main(["merge", "--method", "scaled_mean_test", *base, "--output_dir", str(output), "--beta", "0.5"]) == 0
        expected = merge_state_dicts(
            "scaled_mean_test", vision_state(toy_clip_dir), [vision_state(d) for d in finetuned_dirs[:2]], beta=0.5
        )
        loaded = CLIPModel.from_pretrained(output).vision_model.state_dict()
        key = "encoder.layers.1.mlp.fc2.weight"
        torch.testing.assert_close(loaded[key], expected[key], rtol=0, atol=0)
        assert "--beta 0.5" in ModelCard.load(output / "README.md").text
    finally:
        MERGE_METHODS.pop("scaled_mean_test")
    # The older flag names parse as the new ones.
    parser = HfArgumentParser(merging.merge_arguments_class())
    common = ["--method", "ties", "--output_dir", "o"]
    old = parser.parse_args(common + ["--ties_density", "0.4", "--ties_trim", "tensor", "--ties_aggregation", "mean"])
    new = parser.parse_args(common + ["--density", "0.4", "--trim", "tensor", "--aggregation", "mean"])
    assert vars(old) == vars(new) and new.density == 0.4 and new.aggregation == "mean"
    # DARE through the command, as merge_state_dicts computes it.
    output = tmp_path / "dare"
    assert main(["merge", "--method", "dare_ties", *base, "--output_dir", str(output), "--seed", "5"]) == 0
    expected = merge_state_dicts(
        "dare_ties", vision_state(toy_clip_dir), [vision_state(d) for d in finetuned_dirs[:2]], seed=5
    )
    loaded = CLIPModel.from_pretrained(output).vision_model.state_dict()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key
    capsys.readouterr()
    # AdaMerging is registered, but its coefficients are trained: `hf-moe merge` points to its command.
    assert main(["merge", "--method", "adamerging", *base, "--output_dir", str(tmp_path / "ada")]) == 1
    error = capsys.readouterr().err
    assert "not a static merge" in error and "hf-moe adamerging --base BASE" in error
    assert not (tmp_path / "ada").exists()
