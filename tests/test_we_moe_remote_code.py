"""A saved WEMoE folder loads in a fresh process where hf_moe cannot be imported, through `AutoModel` and
`pipeline(..., trust_remote_code=True)`, with outputs identical to the in-process model."""

import json
import textwrap

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, pipeline

from hf_moe.modeling import WEMoECLIPModel, WEMoEConfig

from helpers import clip_inputs, run_without_hf_moe


FRESH_PROCESS = textwrap.dedent(
    """
    import json
    import torch
    from PIL import Image
    from transformers import AutoModel, pipeline

    folder, workdir = sys.argv[1], sys.argv[2]
    try:
        import hf_moe  # noqa: F401
        raise SystemExit("hf_moe was importable")
    except ImportError:
        pass
    inputs = torch.load(f"{workdir}/inputs.pt")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(**inputs, output_routing_weights=True)
    torch.save({"logits": out.logits_per_image, "routing": out.routing_weights, "class": type(model).__name__,
                "module": type(model).__module__}, f"{workdir}/outputs.pt")
    classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    result = classifier(Image.open(f"{workdir}/image.png"), candidate_labels=["a cat", "a dog", "a digit"])
    json.dump(result, open(f"{workdir}/pipeline.json", "w"))
    assert not any(name.startswith("hf_moe") for name in sys.modules)
    """
)


def test_fresh_process_without_hf_moe_loads_through_auto_model_and_pipeline(toy_clip_dir, tmp_path):
    dense = CLIPModel.from_pretrained(toy_clip_dir)
    vision = {**dense.config.vision_config.to_dict(), "num_tasks": 3}
    config = WEMoEConfig(
        text_config=dense.config.text_config.to_dict(),
        vision_config=vision,
        projection_dim=dense.config.projection_dim,
        router_depth=2,
        shared_router=True,
        task_vector_format="pruned",
        task_names=["a", "b", "c"],
    )
    torch.manual_seed(0)
    model = WEMoECLIPModel(config).eval()
    model.load_state_dict(dense.state_dict(), strict=False)
    pretrained = {k[len("vision_model.") :]: v for k, v in dense.state_dict().items() if "vision_model" in k}
    pretrained = {k: v for k, v in pretrained.items() if ".mlp." in k}
    model.load_task_vectors(pretrained, [{k: torch.randn_like(v) * 0.05 for k, v in pretrained.items()}] * 3)
    with torch.no_grad():  # routers that route each sample differently
        for param in model.vision_model.encoder.router.parameters():
            param.normal_(0, 0.5)
    folder = tmp_path / "we-moe"
    model.save_pretrained(folder)
    CLIPProcessor.from_pretrained(toy_clip_dir).save_pretrained(folder)
    assert {"configuration_we_moe.py", "modeling_we_moe.py"} <= {p.name for p in folder.iterdir()}

    inputs = clip_inputs(model.config, pad=2)
    torch.save(inputs, tmp_path / "inputs.pt")
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    image.save(tmp_path / "image.png")
    run_without_hf_moe(FRESH_PROCESS, [folder, tmp_path], tmp_path)

    remote = torch.load(tmp_path / "outputs.pt")
    assert remote["class"] == "WEMoECLIPModel" and remote["module"].startswith("transformers_modules")
    with torch.no_grad():
        local = model(**inputs, output_routing_weights=True)
    torch.testing.assert_close(remote["logits"], local.logits_per_image, atol=0, rtol=0)
    assert len(remote["routing"]) == 2 and remote["routing"][0].shape == (3, 3)
    for theirs, ours in zip(remote["routing"], local.routing_weights):
        torch.testing.assert_close(theirs, ours, atol=0, rtol=0)

    classifier = pipeline("zero-shot-image-classification", model=str(folder))
    expected = classifier(Image.open(tmp_path / "image.png"), candidate_labels=["a cat", "a dog", "a digit"])
    remote_result = json.loads((tmp_path / "pipeline.json").read_text())
    assert [r["label"] for r in remote_result] == [r["label"] for r in expected]
    np.testing.assert_allclose([r["score"] for r in remote_result], [r["score"] for r in expected], rtol=1e-6)
