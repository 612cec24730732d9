"""A saved CLIP-MoE folder loads in a fresh process where hf_moe cannot be imported, through
`AutoModel` and `pipeline(..., trust_remote_code=True)`, with outputs identical to the in-process model."""

import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from hf_moe.modeling import CLIPMoEModel

from helpers import clip_inputs, run_without_hf_moe


FRESH_PROCESS = textwrap.dedent(
    """
    import json
    import torch
    from PIL import Image
    from transformers import AutoModel, pipeline

    folder, workdir, per_tower = sys.argv[1], sys.argv[2], sys.argv[3]
    try:
        import hf_moe  # noqa: F401
        raise SystemExit("hf_moe was importable")
    except ImportError:
        pass
    inputs = torch.load(f"{workdir}/inputs.pt")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(**inputs, output_router_logits=True)
    torch.save({"logits": out.logits_per_image, "aux": out.aux_loss, "class": type(model).__name__,
                "module": type(model).__module__}, f"{workdir}/outputs.pt")
    classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    result = classifier(Image.open(f"{workdir}/image.png"), candidate_labels=["a cat", "a dog", "a digit"])
    json.dump(result, open(f"{workdir}/pipeline.json", "w"))

    model = AutoModel.from_pretrained(per_tower, trust_remote_code=True).eval()
    towers = {"vision": model.config.vision_config, "text": model.config.text_config}
    with torch.no_grad():
        out = model(**inputs, output_router_logits=True)
    torch.save({
        "values": {name: (tower.expert_dropout, tower.router_aux_loss_coef) for name, tower in towers.items()},
        "dropout": {name: getattr(model, f"{name}_model").encoder.layers[0].mlp.experts.act_fn.dropout.p
                    for name in towers},
        "router_loss": out.router_loss,
    }, f"{workdir}/per_tower.pt")
    assert not any(name.startswith("hf_moe") for name in sys.modules)
    """
)


def test_fresh_process_without_hf_moe_loads_through_auto_model_and_pipeline(upcycled_dir, tmp_path):
    model = CLIPMoEModel.from_pretrained(upcycled_dir).eval()
    # Make the routing matter: with random larger routers, different experts weigh in per token.
    inputs = clip_inputs(model.config, pad=2)
    torch.save(inputs, tmp_path / "inputs.pt")
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    image.save(tmp_path / "image.png")
    # Towers that differ (the recipe's per-tower balance weights) must come back as saved through remote code too.
    per_tower = CLIPMoEModel.from_pretrained(upcycled_dir).eval()
    per_tower.config.vision_config.expert_dropout = 0.1
    per_tower.config.vision_config.router_aux_loss_coef, per_tower.config.text_config.router_aux_loss_coef = 0.01, 0.005
    per_tower.save_pretrained(tmp_path / "per_tower")
    run_without_hf_moe(FRESH_PROCESS, [upcycled_dir, tmp_path, tmp_path / "per_tower"], tmp_path)

    remote = torch.load(tmp_path / "outputs.pt")
    assert remote["class"] == "CLIPMoEModel" and remote["module"].startswith("transformers_modules")
    with torch.no_grad():
        local = model(**inputs, output_router_logits=True)
    torch.testing.assert_close(remote["logits"], local.logits_per_image, atol=0, rtol=0)
    torch.testing.assert_close(remote["aux"], local.aux_loss, atol=0, rtol=0)

    classifier = pipeline("zero-shot-image-classification", model=str(upcycled_dir))
    expected = classifier(Image.open(tmp_path / "image.png"), candidate_labels=["a cat", "a dog", "a digit"])
    remote_result = json.loads((tmp_path / "pipeline.json").read_text())
    assert [r["label"] for r in remote_result] == [r["label"] for r in expected]
    np.testing.assert_allclose([r["score"] for r in remote_result], [r["score"] for r in expected], rtol=1e-6)

    remote_per_tower = torch.load(tmp_path / "per_tower.pt")
    assert remote_per_tower["values"] == {"vision": (0.1, 0.01), "text": (0.0, 0.005)}
    assert remote_per_tower["dropout"] == {"vision": 0.1, "text": 0.0}
    with torch.no_grad():
        local_router_loss = per_tower(**inputs, output_router_logits=True).router_loss
    torch.testing.assert_close(remote_per_tower["router_loss"], local_router_loss, atol=0, rtol=0)


def test_a_failing_fresh_process_shows_its_stderr(tmp_path):
    script = "import sys\nsys.stderr.write('the reason it failed\\n')\nraise SystemExit(3)\n"
    with pytest.raises(AssertionError, match=r"(?s)exited with 3.*the reason it failed"):
        run_without_hf_moe(script, [], tmp_path)


# Every from_pretrained argument a user passes, in a fresh process without hf_moe (issue 15, deliverable 3).
FROM_PRETRAINED_ARGUMENTS = textwrap.dedent(
    """
    import time, traceback
    import torch
    from transformers import AutoModel

    folder, workdir = sys.argv[1], sys.argv[2]
    inputs = torch.load(f"{workdir}/inputs.pt")
    results, errors = {}, {}

    def case(name):
        def register(fn):
            start = time.perf_counter()
            try:
                results[name] = fn()
            except Exception:
                errors[name] = traceback.format_exc()[-3000:]
            print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        return register

    def load(**kwargs):
        return AutoModel.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()

    def logits(model, dtype=torch.float32):
        batch = {key: value.to(dtype) if value.is_floating_point() else value for key, value in inputs.items()}
        with torch.no_grad():
            return model(**batch).logits_per_image.float()

    @case("default")
    def _():
        return logits(load())

    @case("dtype=float32")
    def _():
        return logits(load(dtype=torch.float32))

    @case("dtype=bfloat16")
    def _():
        model = load(dtype=torch.bfloat16)
        stray = sorted({str(p.dtype) for p in model.parameters()} - {"torch.bfloat16"})
        assert not stray, f"parameters left in {stray}"
        return logits(model, torch.bfloat16)

    @case("device_map=auto")
    def _():
        return logits(load(device_map="auto"))

    for attn in ("eager", "sdpa"):
        @case(f"attn_implementation={attn}")
        def _():
            model = load(attn_implementation=attn)
            assert model.config._attn_implementation == attn
            return logits(model)

    for experts in ("eager", "batched_mm", "grouped_mm"):
        @case(f"experts_implementation={experts}")
        def _():
            return logits(load(experts_implementation=experts))

    @case("torch.compile")
    def _():
        # aot_eager: dynamo's trace and AOT autograd of the model code; inductor's C++ build of a CLIP-MoE takes
        # minutes on 2 busy cores (it works: checked by hand).
        return logits(torch.compile(load(), backend="aot_eager"))

    @case("gradient_checkpointing_enable")
    def _():
        losses = []
        for checkpointing in (False, True):
            model = load().train()
            if checkpointing:
                model.gradient_checkpointing_enable()
            loss = model(**inputs, return_loss=True).loss
            loss.backward()
            grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
            losses.append(torch.stack([loss.detach(), *grads]))
        torch.testing.assert_close(losses[1], losses[0])
        return losses[1]

    @case("onnx export (default experts implementation)")
    def _():
        # onnx, onnxscript and onnxruntime come with the test extra.
        model = load()
        program = torch.onnx.export(model, (), kwargs=dict(inputs), dynamo=True)
        expected = logits(model)
        matches = [o for o in program(**inputs) if o.shape == expected.shape and torch.allclose(o, expected, atol=1e-4)]
        assert matches, "no output of the ONNX program (onnxruntime) matches logits_per_image"
        return matches[0]

    torch.save({"results": results, "errors": errors}, f"{workdir}/arguments.pt")
    assert not any(name.startswith("hf_moe") for name in sys.modules)
    """
)


def _we_moe_folder(toy_clip_dir, folder):
    from transformers import CLIPModel

    from hf_moe.modeling import WEMoECLIPModel, WEMoEConfig

    dense = CLIPModel.from_pretrained(toy_clip_dir)
    config = WEMoEConfig(
        text_config=dense.config.text_config.to_dict(),
        vision_config={**dense.config.vision_config.to_dict(), "num_tasks": 2},
        projection_dim=dense.config.projection_dim,
    )
    torch.manual_seed(0)
    model = WEMoECLIPModel(config)
    model.load_state_dict(dense.state_dict(), strict=False)
    with torch.no_grad():  # task vectors and routers that make the routing matter
        for name, param in model.vision_model.named_parameters():
            if "task_vectors" in name or "router" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["clip_moe", "we_moe"])
def test_every_from_pretrained_argument_works_in_a_fresh_process_without_hf_moe(family, upcycled_dir, toy_clip_dir,
                                                                                   tmp_path):  # fmt: skip
    from transformers import AutoModel

    folder = upcycled_dir if family == "clip_moe" else _we_moe_folder(toy_clip_dir, tmp_path / "we-moe")
    model = AutoModel.from_pretrained(folder).eval()  # hf_moe's registered class, in process
    inputs = clip_inputs(model.config, pad=2)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
    run_without_hf_moe(FROM_PRETRAINED_ARGUMENTS, [folder, tmp_path], tmp_path)

    outcome = torch.load(tmp_path / "arguments.pt")
    assert not outcome["errors"], "\n\n".join(f"{name}:\n{error}" for name, error in outcome["errors"].items())
    results = outcome["results"]
    for name, value in results.items():
        if name.startswith(("default", "dtype=float32", "device_map", "attn_", "experts_")):
            torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(results["dtype=bfloat16"], expected, atol=0.15, rtol=0.05)
    torch.testing.assert_close(results["torch.compile"], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results["onnx export (default experts implementation)"], expected, atol=1e-4, rtol=1e-4)
