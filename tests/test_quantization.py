"""bitsandbytes 4-/8-bit loading of CLIP-MoE behaves as it does for transformers' Mixtral (the control, a tiny
`MixtralForCausalLM` built here): transformers swaps every `nn.Linear` for a bitsandbytes layer and has no path for
packed 3-D experts, so the experts (and the routers) of both stay in the loading dtype, untouched; the quantized
model computes the fp32 function of the dequantized weights; the memory footprint shrinks by the quantized linear
weights exactly; and our models say once that the experts stay unquantized. Runs on CPU (bitsandbytes >= 0.48 has a
CPU backend); skipped where bitsandbytes is not installed or has no backend for this machine's devices."""

import json
import textwrap

import pytest
import torch
from torch import nn
from transformers.utils import is_bitsandbytes_available


if not is_bitsandbytes_available():
    pytest.skip(
        "bitsandbytes is not installed (pip install bitsandbytes): quantized loading cannot be tested",
        allow_module_level=True,
    )

from transformers.integrations import validate_bnb_backend_availability  # noqa: E402


if not validate_bnb_backend_availability():
    pytest.skip("the installed bitsandbytes has no backend for this machine's devices", allow_module_level=True)

import bitsandbytes as bnb  # noqa: E402
from transformers import BitsAndBytesConfig, MixtralConfig, MixtralForCausalLM  # noqa: E402
from transformers.quantizers.base import get_keys_to_not_convert  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_moe.modeling import CLIPMoEModel  # noqa: E402

from helpers import clip_inputs, run_without_hf_moe  # noqa: E402


# bitsandbytes parameter class, its storage dtype and bytes per weight (4-bit packs two weights per uint8 byte).
QUANTIZATIONS = {
    "4bit": (dict(load_in_4bit=True), bnb.nn.Params4bit, torch.uint8, 0.5),
    "8bit": (dict(load_in_8bit=True), bnb.nn.Int8Params, torch.int8, 1.0),
}
# Relative error ||quantized - fp32|| / ||fp32|| of the outputs. transformers' own bitsandbytes tests compare greedy
# generations of 1B-parameter checkpoints, which do not transfer to random tiny models (4-bit flips a quarter of
# the Mixtral control's argmaxes); both models here measure about 0.14 (4-bit) and 0.010 (8-bit), and each must stay
# within the same bound.
RELATIVE_ERROR = {"4bit": 0.25, "8bit": 0.02}


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    folder = tmp_path_factory.mktemp("mixtral") / "mixtral"
    MixtralForCausalLM(config).save_pretrained(folder)
    return folder


def load(cls, folder, bits: str | None = None, **kwargs):
    if bits is None:
        return cls.from_pretrained(folder, **kwargs).eval()
    quantization = BitsAndBytesConfig(**QUANTIZATIONS[bits][0])
    return cls.from_pretrained(folder, quantization_config=quantization, device_map="cpu", **kwargs).eval()


def quantized_names(model) -> set[str]:
    return {
        name for name, param in model.named_parameters() if isinstance(param, (bnb.nn.Params4bit, bnb.nn.Int8Params))
    }


def role(name: str) -> str | None:
    """The kind of MoE-layer weight a parameter is (Mixtral names its router `gate`, we name ours `router`)."""
    if ".mlp.experts." in name:
        return "experts"
    if name.endswith((".mlp.gate.weight", ".mlp.router.weight")):
        return "router"
    if ".self_attn." in name and name.endswith("proj.weight"):
        return "attention projections"
    return None


def roles(model) -> dict[str, set[str]]:
    """The storage (parameter class, dtype) of each kind of MoE-layer weight."""
    found = {"experts": set(), "router": set(), "attention projections": set()}
    for name, param in model.named_parameters():
        if role(name):
            found[role(name)].add(f"{type(param).__name__} {param.dtype}")
    return found


def models(mixtral_dir, upcycled_dir):
    return {"Mixtral": (MixtralForCausalLM, mixtral_dir), "CLIP-MoE": (CLIPMoEModel, upcycled_dir)}


def outputs(name: str, model):
    with torch.no_grad():
        if name == "Mixtral":
            return model(torch.arange(2, 18).reshape(2, 8)).logits
        out = model(**clip_inputs(model.config, pad=2))
        return torch.cat([out.logits_per_image.flatten(), out.image_embeds.flatten(), out.text_embeds.flatten()])


@pytest.mark.parametrize("bits", QUANTIZATIONS)
def test_quantized_parameters_are_those_transformers_quantizes_for_mixtral(mixtral_dir, upcycled_dir, bits):
    _, parameter_class, storage, _ = QUANTIZATIONS[bits]
    for name, (cls, folder) in models(mixtral_dir, upcycled_dir).items():
        reference, quantized = load(cls, folder), load(cls, folder, bits)
        # transformers' rule: every nn.Linear weight but the output embeddings / last module it keeps.
        kept = get_keys_to_not_convert(reference)
        linear_weights = {
            f"{module_name}.weight"
            for module_name, module in reference.named_modules()
            if type(module) is nn.Linear and module_name not in kept
        }
        assert quantized_names(quantized) == linear_weights, name
        assert roles(quantized) == {
            "experts": {"Parameter torch.float32"},
            "router": {"Parameter torch.float32"},
            "attention projections": {f"{parameter_class.__name__} {storage}"},
        }, name
        # The packed experts and routers come through untouched.
        loaded = dict(reference.named_parameters())
        for param_name, param in quantized.named_parameters():
            if role(param_name) in ("experts", "router"):
                torch.testing.assert_close(param, loaded[param_name], atol=0, rtol=0, msg=f"{name}: {param_name}")


@pytest.mark.parametrize("bits", QUANTIZATIONS)
def test_quantized_forward_is_close_to_fp32_as_mixtrals_is(mixtral_dir, upcycled_dir, bits):
    for name, (cls, folder) in models(mixtral_dir, upcycled_dir).items():
        expected = outputs(name, load(cls, folder))
        quantized = load(cls, folder, bits)
        actual = outputs(name, quantized)
        error = ((actual.float() - expected).norm() / expected.norm()).item()
        assert error < RELATIVE_ERROR[bits], f"{name} {bits}: relative error {error:.3f}"
        if bits == "4bit":
            # On CPU bitsandbytes dequantizes the 4-bit weights and runs the fp32 matmul: the quantized model is
            # exactly the fp32 model holding the dequantized weights (experts and routers as loaded).
            quantized.dequantize()
            torch.testing.assert_close(actual, outputs(name, quantized), atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("bits", QUANTIZATIONS)
def test_memory_footprint_shrinks_by_the_quantized_linear_weights_only(mixtral_dir, upcycled_dir, bits):
    bytes_per_weight = QUANTIZATIONS[bits][3]
    for name, (cls, folder) in models(mixtral_dir, upcycled_dir).items():
        reference, quantized = load(cls, folder), load(cls, folder, bits)
        shapes = dict(reference.named_parameters())
        saved = sum(shapes[param].numel() * (4 - bytes_per_weight) for param in quantized_names(quantized))
        assert saved > 0
        # Nothing else shrinks: the experts keep their fp32 bytes, for Mixtral as for CLIP-MoE.
        assert reference.get_memory_footprint() - quantized.get_memory_footprint() == saved, name


def test_bitsandbytes_load_notes_once_that_the_experts_stay_unquantized(upcycled_dir, caplog):
    hf_logging.warning_once.cache_clear()  # an earlier load in this process may have given the note already
    with caplog.at_level("WARNING"):
        load(CLIPMoEModel, upcycled_dir)
    assert "packed experts" not in caplog.text
    with caplog.at_level("WARNING"):
        model = load(CLIPMoEModel, upcycled_dir, "4bit", dtype=torch.bfloat16)
    notes = [record.getMessage() for record in caplog.records if "packed experts" in record.getMessage()]
    experts = sum(p.numel() for module_name, p in model.named_parameters() if ".mlp.experts." in module_name)
    share = experts / sum(p.numel() for p in load(CLIPMoEModel, upcycled_dir).parameters())
    assert notes == [
        "bitsandbytes quantizes nn.Linear layers only: the packed experts of CLIPMoEModel "
        f"({share:.0%} of its parameters) stay in torch.bfloat16, as transformers' Mixtral experts do."
    ]


def test_moiie_notes_once_per_load_of_its_causal_lm(tmp_path, caplog):
    """The causal LM wraps MoIIEModel: one note, naming the model that holds the experts, not one per level."""
    from test_moiie_model import tiny_model
    from transformers import AutoModelForCausalLM

    tiny_model().save_pretrained(tmp_path / "moiie")
    hf_logging.warning_once.cache_clear()
    with caplog.at_level("WARNING"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "moiie", quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
        )
    notes = [record.getMessage() for record in caplog.records if "packed experts" in record.getMessage()]
    assert len(notes) == 1 and "packed experts of MoIIEModel" in notes[0], notes


FRESH_PROCESS = textwrap.dedent(
    """
    import json, logging
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModel, BitsAndBytesConfig

    folder, workdir = sys.argv[1], sys.argv[2]
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    inputs = torch.load(f"{workdir}/inputs.pt")
    model = AutoModel.from_pretrained(
        folder, trust_remote_code=True, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
    )
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    notes = [m for m in messages if "packed experts" in m]
    messages.clear()
    model.save_pretrained(f"{workdir}/4bit")
    reloaded = AutoModel.from_pretrained(f"{workdir}/4bit", trust_remote_code=True, device_map="cpu")
    with torch.no_grad():
        reloaded_logits = reloaded(**inputs).logits_per_image
    torch.save({"logits": logits, "reloaded": reloaded_logits}, f"{workdir}/outputs.pt")
    json.dump({
        "module": type(model).__module__,
        "quantized": sorted(n for n, p in model.named_parameters() if isinstance(p, bnb.nn.Params4bit)),
        "reloaded_quantized": sorted(n for n, p in reloaded.named_parameters() if isinstance(p, bnb.nn.Params4bit)),
        "notes": notes,
        "reloaded_notes": [m for m in messages if "packed experts" in m],
    }, open(f"{workdir}/report.json", "w"))
    assert not any(name.startswith("hf_moe") for name in sys.modules)
    """
)


def test_remote_code_loads_4bit_and_reloads_the_saved_4bit_model_without_hf_moe(upcycled_dir, tmp_path):
    in_process = load(CLIPMoEModel, upcycled_dir, "4bit")
    inputs = clip_inputs(in_process.config, pad=2)
    torch.save(inputs, tmp_path / "inputs.pt")
    run_without_hf_moe(FRESH_PROCESS, [upcycled_dir, tmp_path], tmp_path)

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["module"].startswith("transformers_modules")
    assert report["quantized"] == report["reloaded_quantized"] == sorted(quantized_names(in_process))
    # Also said when a saved 4-bit checkpoint is loaded (its config.json carries the quantization config).
    assert len(report["notes"]) == len(report["reloaded_notes"]) == 1
    assert "stay in torch.float32" in report["notes"][0] and report["reloaded_notes"] == report["notes"]
    remote = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        expected = in_process(**inputs).logits_per_image
    torch.testing.assert_close(remote["logits"], expected, atol=0, rtol=0)
    torch.testing.assert_close(remote["reloaded"], expected, atol=0, rtol=0)
