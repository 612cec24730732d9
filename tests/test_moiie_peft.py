"""PEFT LoRA for MoIIE (hf_moe.moiie.lora): at init the LoRA model is the base model; gradients reach exactly the
adapters of the chosen targets plus the routers and projector (modules_to_save); the merged model is the LoRA model
under every experts implementation; `hf-moe train-moiie --lora_rank` (with gradient checkpointing) lowers the loss,
saves a plain merged MoIIE and resumes from its adapter checkpoints; contradicting options are refused before
anything is written."""

import json
import shutil

import pytest
import torch
from test_moiie_checkpointing import image_batch, llama_model, phi3_model
from test_moiie_train_command import inputs, run, weights  # noqa: F401 (inputs is a fixture)
from test_moiie_training import toy_processor
from transformers import AutoModelForCausalLM, HfArgumentParser

from hf_moe.moiie.data import MoIIECollator, load_conversations
from hf_moe.moiie.lora import LORA_TRAINABLE_PARAMETERS, MoIIELoraArguments, apply_lora, check_lora_stage
from hf_moe.moiie.train import MoIIEScriptArguments, moiie_job
from hf_moe.moiie.trainer import MoIIETrainingArguments
from hf_moe.training import JOB_FILE, freeze_all_but

from conftest import experts_implementations


ATTENTION = {"phi3": {"qkv_proj", "o_proj"}, "llama": {"q_proj", "k_proj", "v_proj", "o_proj"}}


def lora_model(build, tmp_path, target="all", **stage):
    model, image_token_id = build()
    args = MoIIETrainingArguments(output_dir=str(tmp_path), stage="finetune", report_to=[], use_cpu=True, **stage)
    peft_model = apply_lora(model, MoIIELoraArguments(lora_rank=4, lora_alpha=8, lora_target=target), args)
    freeze_all_but(peft_model, LORA_TRAINABLE_PARAMETERS)  # what MoIIETrainer does with these patterns
    return peft_model, model, image_token_id


def perturb_adapters(peft_model, seed=1):
    """LoRA B starts at zero (so A gets no gradient and the adapter changes nothing): give every factor a value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize(
    "build,target",
    [(phi3_model, "all"), (llama_model, "all"), (phi3_model, "attention"), (llama_model, "experts")],
    ids=["phi3-all", "llama-all", "phi3-attention", "llama-experts"],
)
def test_lora_starts_as_the_base_model_and_trains_exactly_adapters_routers_projector(build, target, tmp_path):
    base, image_token_id = build()
    batch = image_batch(base.config, image_token_id)
    with torch.no_grad():
        expected = base.eval()(**batch).logits
    peft_model, model, _ = lora_model(build, tmp_path, target)
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(**batch).logits, expected, atol=1e-6, rtol=0)
    perturb_adapters(peft_model)
    peft_model.train()
    out = peft_model(**batch, output_router_logits=True)
    assert out.vision_aux_loss is not None  # the routers' copies still report their logits
    out.loss.backward()
    reached = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == {n for n, p in peft_model.named_parameters() if p.requires_grad}
    decoder = model.config.text_config.model_type
    adapted, whole = set(), set()
    for name in reached:
        if ".lora_" in name:
            assert ".language_model.layers." in name, name  # never the vision tower's attention
            module = name.split(".lora_")[0].removesuffix(".base_layer")
            adapted.add(module.split(".")[-1] if ".self_attn." in name else "experts")
        else:
            assert ".modules_to_save." in name, name
            whole.add(name.split(".modules_to_save.")[0].split(".")[-1])
    expected = ({"experts"} if target != "attention" else set()) | (
        ATTENTION[decoder] if target != "experts" else set()
    )
    assert adapted == expected
    assert whole == {"vision_router", "language_router", "multi_modal_projector"}
    # both packed expert parameters carry an adapter when the experts are targeted
    expert_factors = {n for n in reached if ".mlp.experts." in n}
    assert len(expert_factors) == (4 * len(model.config.moe_layers) if target != "attention" else 0)


def test_moe_only_lora_trains_expert_adapters_and_routers(tmp_path):
    peft_model, _, _ = lora_model(llama_model, tmp_path, "experts", moe_only=True)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".mlp.experts." in n or "_router.modules_to_save." in n for n in trainable)


def test_merged_model_is_the_lora_model_under_every_experts_implementation(tmp_path):
    peft_model, model, image_token_id = lora_model(llama_model, tmp_path)
    perturb_adapters(peft_model)
    batch = image_batch(model.config, image_token_id)
    peft_model.eval()
    with torch.no_grad():
        model.set_experts_implementation("eager")
        expected = peft_model(**batch).logits
        for implementation in experts_implementations():
            model.set_experts_implementation(implementation)
            torch.testing.assert_close(peft_model(**batch).logits, expected, atol=1e-5, rtol=0, msg=implementation)
        merged = peft_model.merge_and_unload()
        assert not [n for n in merged.state_dict() if "lora_" in n or "modules_to_save" in n or "base_layer" in n]
        for implementation in experts_implementations():
            merged.set_experts_implementation(implementation)
            torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=0, msg=implementation)


def collated_loss(model, inputs):  # noqa: F811
    dataset = load_conversations(inputs / "data.json", inputs / "images")
    batch = MoIIECollator(toy_processor())([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        return model.eval()(**batch).loss.item()


def test_train_moiie_lora_lowers_the_loss_saves_a_merged_model_and_resumes(inputs):  # noqa: F811
    lora = ["--lora_rank", "4", "--lora_alpha", "8", "--max_steps", "3", "--save_steps", "2"]
    lora += ["--gradient_checkpointing", "true"]  # with the embeddings frozen, as LoRA leaves them
    assert run(inputs, *lora) == 0
    out = inputs / "out"
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()  # checkpoints hold the adapter
    before, after = weights(inputs / "model"), weights(out)
    assert before.keys() == after.keys()  # a plain MoIIE: no PEFT names left
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(".self_attn.qkv_proj." in n for n in changed) and any(".mlp.experts." in n for n in changed)
    assert any("_router." in n for n in changed) and any("multi_modal_projector." in n for n in changed)
    assert all(
        ".self_attn." in n or ".mlp.experts." in n or "_router." in n or "multi_modal_projector." in n for n in changed
    )
    base = AutoModelForCausalLM.from_pretrained(inputs / "model")
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert collated_loss(trained, inputs) < collated_loss(base, inputs)
    options = json.loads((out / "hf_moe_job.json").read_text())["options"]
    assert options["lora_rank"] == 4 and options["lora_target"] == "all" and options["lora_alpha"] == 8
    assert "LoRA" in (out / "README.md").read_text()

    # What a kill during step 3 leaves: resuming from the adapter checkpoint (routers and projector included, as
    # modules_to_save) gives the same merged model.
    shutil.rmtree(out / "checkpoint-3")
    for name in ("model.safetensors", "config.json"):
        (out / name).unlink()
    job = json.loads((out / JOB_FILE).read_text())
    (out / JOB_FILE).write_text(json.dumps({**job, "complete": False}))
    assert run(inputs, *lora) == 0
    resumed = weights(out)
    for name, value in after.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-5, rtol=0, msg=name)


def test_a_lora_job_and_a_full_job_differ(inputs):  # noqa: F811
    parser = HfArgumentParser((MoIIEScriptArguments, MoIIETrainingArguments, MoIIELoraArguments))
    argv = ["--model", str(inputs / "model"), "--data", str(inputs / "data.json"), "--output_dir", str(inputs / "o")]
    lora = moiie_job(*parser.parse_args_into_dataclasses(argv + ["--use_cpu", "--lora_rank", "4"]))
    full = moiie_job(*parser.parse_args_into_dataclasses(argv + ["--use_cpu"]))
    assert full.differences({"command": "train-moiie", "options": lora.options, "inputs": lora.inputs}) == [
        "--lora_rank: 4 (recorded) vs 0 (now)"
    ]


def test_lora_is_refused_under_zero3(tmp_path, monkeypatch):
    import transformers.integrations

    args = MoIIETrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match="ZeRO-3"):
        check_lora_stage(MoIIELoraArguments(lora_rank=4), args)
    check_lora_stage(MoIIELoraArguments(lora_rank=0), args)  # no LoRA, nothing to refuse


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--stage", "pretrain"], "applies to --stage finetune"),
        (["--lora_dropout", "0.1"], "PEFT cannot apply LoRA dropout to the packed experts"),
        (["--moe_only", "true", "--lora_target", "all"], "use --lora_target experts"),
    ],
)
def test_contradicting_lora_options_are_refused_before_writing(inputs, capsys, extra, message):  # noqa: F811
    assert run(inputs, "--lora_rank", "4", *extra) == 1
    assert message in capsys.readouterr().err
    assert not (inputs / "out").exists() or not any((inputs / "out").iterdir())
