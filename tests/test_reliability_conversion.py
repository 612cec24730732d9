"""Reliability of the converters and mergers (issue 14): NaN / inf inputs and options refused by name with nothing
written (no output folder, no temporary sibling), models of the wrong family refused by family, and warnings for
plausible mistakes (a fine-tune given twice, the pretrained model given as a fine-tune, repeated task names, more
fine-tunes than AdaMerging tasks)."""

import logging
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_merging import save_clip_finetune, save_vision_finetune
from transformers import CLIPModel

from hf_moe.checkpoint_io import NonFiniteError, check_finite_options, non_finite_counts
from hf_moe.cli import main
from hf_moe.conversion import convert_clip_moe_original, merge_wemoe, upcycle_clip, upcycle_moiie
from hf_moe.merging import merge_clip_vision, merge_state_dicts, task_vectors


MLP_KEY = "encoder.layers.1.mlp.fc1.weight"  # a tensor of a WEMoE block (the MLP's task vectors)
ATTENTION_KEY = "encoder.layers.0.self_attn.q_proj.weight"  # merged by task arithmetic


@pytest.fixture(scope="module")
def finetunes(toy_clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return [save_vision_finetune(toy_clip_dir, root / f"task{i}", seed=60 + i) for i in range(2)]


def poisoned_copy(folder, target, key, values=(math.nan,) * 3):
    """A copy of the model folder `folder` whose tensor `key` (an exact checkpoint name) has its first entries set
    to `values`."""
    shutil.copytree(folder, target)
    weights = target / "model.safetensors"
    state = load_file(weights)
    flat = state[key].view(-1)
    for index, value in enumerate(values):
        flat[index] = value
    save_file(state, weights, metadata={"format": "pt"})
    return target


def assert_nothing_written(output_dir):
    assert not output_dir.exists()
    assert not list(output_dir.parent.glob(f".{output_dir.name}.*")), "a temporary sibling was left behind"


# ------------------------------------------------------------------------------------------ NaN / inf tensors


def test_non_finite_counts():
    assert non_finite_counts(torch.randn(100)) is None
    assert non_finite_counts(torch.tensor([1.0, math.nan, math.inf, -math.inf])) == (1, 2)
    assert non_finite_counts(torch.tensor([3e38, 3e38])) is None  # the sum overflows, the values are finite
    assert non_finite_counts(torch.tensor([60000.0, 60000.0], dtype=torch.float16)) is None
    assert non_finite_counts(torch.tensor([1.0, math.nan], dtype=torch.bfloat16)) == (1, 0)
    assert non_finite_counts(torch.tensor([1, 2])) is None
    assert non_finite_counts(torch.tensor([1.0, math.nan]).to(torch.float8_e4m3fn)) == (1, 0)


@pytest.mark.parametrize("command", ["merge_wemoe", "task_arithmetic", "ties"])
@pytest.mark.parametrize("where", ["finetuned", "pretrained"])
def test_mergers_refuse_a_nan_tensor_naming_the_input_and_the_key(toy_clip_dir, finetunes, tmp_path, command, where):
    if where == "finetuned":
        bad = poisoned_copy(finetunes[1], tmp_path / "bad", MLP_KEY)
        pretrained, finetuned = toy_clip_dir, [finetunes[0], bad]
        match = rf"fine-tune 2 of 2 \('{bad}'\): {MLP_KEY} holds 3 NaN / 0 inf values"
    else:
        pretrained = poisoned_copy(toy_clip_dir, tmp_path / "bad", f"vision_model.{ATTENTION_KEY}", (math.inf,))
        finetuned = finetunes
        match = rf"the pretrained model '{pretrained}': vision_model.{ATTENTION_KEY} holds 0 NaN / 1 inf values"
    output = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=match):
        if command == "merge_wemoe":
            merge_wemoe(pretrained, finetuned, output, return_model=False)
        else:
            merge_clip_vision(command, pretrained, finetuned, output, return_model=False)
    assert_nothing_written(output)


def test_merge_command_prints_the_nan_refusal_in_one_line(toy_clip_dir, finetunes, tmp_path, capsys):
    bad = poisoned_copy(finetunes[0], tmp_path / "bad", MLP_KEY)
    args = ["merge-wemoe", str(toy_clip_dir), str(bad), str(finetunes[1]), "--output_dir", str(tmp_path / "out")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"fine-tune 1 of 2 ('{bad}'): {MLP_KEY} holds 3 NaN / 0 inf values" in err and "Traceback" not in err
    assert_nothing_written(tmp_path / "out")


def test_upcycle_clip_refuses_a_nan_base_even_mid_stream(toy_clip_dir, tmp_path):
    # Base 2's MLPs are read only while the output is being written (expert 1 of the stacked experts).
    key = "vision_model.encoder.layers.1.mlp.fc2.bias"
    bases = [toy_clip_dir, poisoned_copy(toy_clip_dir, tmp_path / "bad", key, (math.nan, math.inf))]
    with pytest.raises(NonFiniteError, match=rf"base 2 of 2 \('{bases[1]}'\): {key} holds 1 NaN / 1 inf values"):
        upcycle_clip(bases, tmp_path / "out", top_k=1, return_model=False)
    assert_nothing_written(tmp_path / "out")
    with pytest.raises(NonFiniteError, match=rf"base '{bases[1]}': {key} holds"):
        upcycle_clip(bases[1], tmp_path / "out", num_experts=2, top_k=1, return_model=False)
    assert_nothing_written(tmp_path / "out")


def test_convert_clip_moe_original_refuses_a_nan_in_the_release(toy_clip_dir, tmp_path):
    from test_convert_clip_moe_original import openai_naming

    original = openai_naming(CLIPModel.from_pretrained(toy_clip_dir), 2, 1, 0.01, long_text=False)
    key = "visual.transformer.resblocks.1.experts.1.c_fc.weight"
    original[key][0, 0] = math.nan
    torch.save(original, tmp_path / "release.pt")
    with pytest.raises(NonFiniteError, match=rf"CLIP-MoE release '.*release.pt': {key} holds 1 NaN / 0 inf"):
        convert_clip_moe_original(tmp_path / "release.pt", toy_clip_dir, tmp_path / "out", return_model=False)
    assert_nothing_written(tmp_path / "out")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from test_upcycle_moiie import TEXT
    from transformers import Phi3ForCausalLM

    from moiie_dense import save_dense_parts

    root = tmp_path_factory.mktemp("moiie")
    save_dense_parts(root, TEXT, Phi3ForCausalLM, "phi3")
    return root / "llava"


def test_upcycle_moiie_refuses_a_nan_in_the_language_model(llava_dir, tmp_path):
    state = load_file(llava_dir / "model.safetensors")
    key = next(name for name in state if name.endswith("layers.1.mlp.down_proj.weight"))
    bad = poisoned_copy(llava_dir, tmp_path / "bad", key, (math.inf,) * 2)
    with pytest.raises(NonFiniteError, match=rf"'{bad}': .*layers.1.mlp.down_proj.weight.* holds 0 NaN / 2 inf"):
        upcycle_moiie(bad, None, tmp_path / "out", return_model=False)
    assert_nothing_written(tmp_path / "out")


def test_in_memory_merges_refuse_nan(toy_clip_dir, finetunes):
    from test_merging import vision_state

    base, good, bad = vision_state(toy_clip_dir), vision_state(finetunes[0]), vision_state(finetunes[1])
    bad[MLP_KEY][0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=rf"fine-tune 2 of 2 \('finetuned\[1\]'\): {MLP_KEY} holds 1 NaN"):
        merge_state_dicts("average", base, [good, bad])
    with pytest.raises(NonFiniteError, match=rf"fine-tune 2 of 2 \('b'\): {MLP_KEY} holds 1 NaN"):
        task_vectors(base, [good, bad], names=["p", "a", "b"])


def test_adamerging_load_refuses_nan(toy_clip_dir, finetunes, tmp_path):
    from hf_moe.merging import load_for_merge

    bad = poisoned_copy(finetunes[1], tmp_path / "bad", MLP_KEY)
    with pytest.raises(NonFiniteError, match=rf"fine-tune 2 of 2 \('{bad}'\): {MLP_KEY} holds 3 NaN"):
        load_for_merge(toy_clip_dir, [finetunes[0], bad])


def test_an_output_overflowing_its_dtype_is_refused(toy_clip_dir, finetunes, tmp_path):
    """Finite inputs and options can still overflow: a float16 output holds at most 65504."""
    with pytest.raises(NonFiniteError, match=r"output tensor vision_model\..* \(torch.float16\) would hold .* inf"):
        merge_clip_vision("task_arithmetic", toy_clip_dir, finetunes, tmp_path / "out", scaling=1e6, dtype="float16")
    assert_nothing_written(tmp_path / "out")


# ------------------------------------------------------------------------------------------ NaN / inf options


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_options_are_refused_by_name_before_any_work(toy_clip_dir, finetunes, tmp_path, value):
    with pytest.raises(NonFiniteError, match=rf"option init_lambda={value!r} is not a finite number"):
        merge_wemoe(toy_clip_dir, finetunes, tmp_path / "out", init_lambda=value)
    with pytest.raises(NonFiniteError, match=rf"option prune_ratio={value!r} is not a finite number"):
        merge_wemoe(toy_clip_dir, finetunes, tmp_path / "out", prune_ratio=value)
    with pytest.raises(NonFiniteError, match=rf"'task_arithmetic' option scaling={value!r} is not a finite"):
        merge_clip_vision("task_arithmetic", toy_clip_dir, finetunes, tmp_path / "out", scaling=value)
    with pytest.raises(NonFiniteError, match=rf"'ties' option scaling={value!r} is not a finite"):
        merge_clip_vision("ties", toy_clip_dir, finetunes, tmp_path / "out", scaling=value)
    with pytest.raises(NonFiniteError, match=rf"option router_aux_loss_coef={value!r} is not a finite"):
        upcycle_clip(toy_clip_dir, tmp_path / "out", num_experts=2, top_k=1, router_aux_loss_coef=value)
    assert_nothing_written(tmp_path / "out")


def test_non_finite_options_in_lists_and_tensors_are_named():
    with pytest.raises(NonFiniteError, match=r"option coefficients\['a'\]\[1\]=nan"):
        check_finite_options({"coefficients": {"a": [0.3, math.nan]}})
    with pytest.raises(NonFiniteError, match=r"option weights holds 0 NaN / 1 inf values"):
        check_finite_options({"weights": torch.tensor([1.0, math.inf])})
    check_finite_options({"scaling": 0.3, "trim": "tensor", "flag": True, "none": None, "n": 3})


@pytest.mark.parametrize("flag", ["--init_lambda", "--scaling"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_commands_refuse_non_finite_options_in_one_line(toy_clip_dir, finetunes, tmp_path, capsys, flag, value):
    command = ["merge-wemoe"] if flag == "--init_lambda" else ["merge", "--method", "task_arithmetic"]
    args = [*command, str(toy_clip_dir), *map(str, finetunes), "--output_dir", str(tmp_path / "out"), flag, value]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{flag[2:]}={float(value)!r} is not a finite number" in err and "Traceback" not in err
    assert_nothing_written(tmp_path / "out")


def test_adamerging_refuses_a_non_finite_init_lambda_before_writing(toy_clip_dir, finetunes, tmp_path):
    from hf_moe.we_moe.adamerging import AdaMergingScriptArguments, adamerging
    from hf_moe.we_moe.tta import TTATrainingArguments

    script_args = AdaMergingScriptArguments(
        pretrained=str(toy_clip_dir), finetuned=list(map(str, finetunes)), tasks=["a", "b"], init_lambda=math.nan
    )
    training_args = TTATrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[])
    with pytest.raises(NonFiniteError, match="adamerging option init_lambda=nan is not a finite number"):
        adamerging(script_args, training_args)
    assert_nothing_written(tmp_path / "out")


# ------------------------------------------------------------------------------------------ the wrong family


@pytest.fixture(scope="module")
def wemoe_dir(toy_clip_dir, finetunes, tmp_path_factory):
    output = tmp_path_factory.mktemp("wemoe") / "wemoe"
    merge_wemoe(toy_clip_dir, finetunes, output, return_model=False)
    return output


def test_a_wemoe_given_as_a_dense_model_is_refused_by_family(toy_clip_dir, finetunes, wemoe_dir, tmp_path):
    refusal = rf"'{wemoe_dir}' is already a WEMoE \('we_moe'\); this step needs a DENSE CLIP"
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=refusal):
        upcycle_clip(wemoe_dir, out, num_experts=2, top_k=1)
    with pytest.raises(ValueError, match=refusal):
        merge_clip_vision("average", wemoe_dir, finetunes, out)
    with pytest.raises(ValueError, match=refusal):
        merge_clip_vision("average", toy_clip_dir, [finetunes[0], wemoe_dir], out)
    with pytest.raises(ValueError, match=refusal):
        merge_wemoe(wemoe_dir, finetunes, out)
    with pytest.raises(ValueError, match=refusal):
        merge_wemoe(toy_clip_dir, [wemoe_dir], out)
    from test_convert_clip_moe_original import openai_naming

    torch.save(openai_naming(CLIPModel.from_pretrained(toy_clip_dir), 2, 1, 0.01, False), tmp_path / "r.pt")
    with pytest.raises(ValueError, match=refusal):
        convert_clip_moe_original(tmp_path / "r.pt", wemoe_dir, out)
    assert_nothing_written(out)


def test_a_wemoe_given_to_adamerging_is_refused_before_writing(toy_clip_dir, finetunes, wemoe_dir, tmp_path):
    from hf_moe.merging import load_for_merge

    with pytest.raises(ValueError, match=rf"'{wemoe_dir}' is already a WEMoE \('we_moe'\)"):
        load_for_merge(wemoe_dir, finetunes)  # what adamerging loads its inputs with, before its job record


def test_other_kinds_are_refused_naming_what_the_command_takes(toy_clip_dir, tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"is a 'bert' model; upcycling .* takes model_type 'clip'"):
        upcycle_clip(tmp_path / "bert", tmp_path / "out", num_experts=2, top_k=1)
    with pytest.raises(
        ValueError, match=r"is a 'bert' model; merging .* takes model_type 'clip' or 'clip_vision_model'"
    ):
        merge_clip_vision("average", toy_clip_dir, [tmp_path / "bert"], tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_help_says_which_kinds_each_command_takes(capsys):
    for command in ["merge", "merge-wemoe", "upcycle-clip", "adamerging"]:
        try:
            main([command, "--help"])
        except SystemExit:  # argparse's way out of --help
            pass
        text = " ".join(capsys.readouterr().out.split())
        assert "dense" in text and "refused" in text, command


# ------------------------------------------------------------------------------------------ warnings


@pytest.fixture
def warnings_of(caplog):
    def read():
        return " ".join(
            r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("hf_moe")
        )

    with caplog.at_level(logging.WARNING, logger="hf_moe"):
        yield read


def test_merge_warns_about_the_same_finetune_twice_and_the_pretrained_model(
    toy_clip_dir, finetunes, tmp_path, warnings_of
):
    merge_clip_vision("average", toy_clip_dir, [finetunes[0], finetunes[1]], tmp_path / "ok", return_model=False)
    assert warnings_of() == ""
    merge_clip_vision(
        "average", toy_clip_dir, [finetunes[0], toy_clip_dir, finetunes[0]], tmp_path / "out", return_model=False
    )
    text = warnings_of()
    assert f"fine-tune 2 of 3 ('{toy_clip_dir}') is the pretrained model itself" in text
    assert f"fine-tune 3 of 3 ('{finetunes[0]}') is fine-tune 1 of 3 ('{finetunes[0]}') given again" in text
    assert "holds the" not in text  # the same paths are not warned about twice


def test_merge_warns_about_copies_by_their_weights(toy_clip_dir, finetunes, tmp_path, warnings_of):
    pretrained_copy = save_vision_finetune(toy_clip_dir, tmp_path / "pretrained-copy", seed=None)
    finetune_copy = shutil.copytree(finetunes[1], tmp_path / "finetune-copy")
    merge_wemoe(toy_clip_dir, [*finetunes, pretrained_copy, finetune_copy], tmp_path / "out", return_model=False)
    text = warnings_of()
    assert f"fine-tune 3 of 4 ('{pretrained_copy}') holds the weights of the pretrained model" in text
    assert f"fine-tune 4 of 4 ('{finetune_copy}') holds the same weights as fine-tune 2 of 4" in text


def test_merge_wemoe_warns_about_repeated_task_names(toy_clip_dir, finetunes, tmp_path, warnings_of):
    merge_wemoe(toy_clip_dir, finetunes, tmp_path / "out", task_names=["cars", "cars"], return_model=False)
    assert "Task name(s) ['cars'] are given to several fine-tunes" in warnings_of()


def test_in_memory_task_vectors_warn_about_identical_inputs(toy_clip_dir, finetunes, warnings_of):
    from test_merging import vision_state

    base, tuned = vision_state(toy_clip_dir), vision_state(finetunes[0])
    task_vectors(base, [tuned, base, tuned], names=["p", "a", "b", "c"])
    text = warnings_of()
    assert "fine-tune 2 of 3 ('b') holds the weights of the pretrained model" in text
    assert "fine-tune 3 of 3 ('c') holds the same weights as fine-tune 1 of 3 ('a')" in text


def test_adamerging_warns_about_more_finetunes_than_tasks(toy_clip_dir, finetunes, tmp_path, warnings_of):
    from hf_moe.we_moe.adamerging import AdaMergingScriptArguments, adamerging
    from hf_moe.we_moe.tta import TTATrainingArguments

    script_args = AdaMergingScriptArguments(
        pretrained=str(toy_clip_dir), finetuned=[*map(str, finetunes), str(toy_clip_dir)], tasks=[str(tmp_path / "x")]
    )
    training_args = TTATrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[])
    with pytest.raises((OSError, ValueError)):  # the task folder does not exist: refused after the warnings
        adamerging(script_args, training_args)
    text = warnings_of()
    assert "3 fine-tunes but 1 task folder(s)" in text
    assert f"fine-tune 3 of 3 ('{toy_clip_dir}') is the pretrained model itself" in text


def test_a_clip_model_finetune_warns_nothing(toy_clip_dir, tmp_path, warnings_of):
    finetune = save_clip_finetune(toy_clip_dir, tmp_path / "clip-finetune", seed=3)
    merge_clip_vision("average", toy_clip_dir, [finetune], tmp_path / "out", return_model=False)
    assert warnings_of() == ""


def test_mode_build_refuses_a_nan_expert(tmp_path):
    """`mode build` reads its experts through the same lazy checkpoints: a NaN is refused by the read itself."""
    from test_mode_build import write_clusters

    from hf_moe.conversion import build_mode
    from hf_moe.toy import save_toy_clip

    experts = [save_toy_clip(tmp_path / f"expert{k}", seed=50 + k) for k in range(2)]
    dim = CLIPModel.from_pretrained(experts[1]).config.projection_dim
    clusters = write_clusters(tmp_path / "clusters", dim=dim, encoder=experts[1], pooling="clip")
    key = "text_model.encoder.layers.0.mlp.fc1.bias"
    bad = poisoned_copy(experts[0], tmp_path / "bad", key)
    with pytest.raises(NonFiniteError, match=rf"'{bad}': {key} holds 3 NaN / 0 inf values"):
        build_mode([bad, experts[1]], clusters, tmp_path / "mode", return_model=False)
    assert_nothing_written(tmp_path / "mode")
