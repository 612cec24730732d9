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
