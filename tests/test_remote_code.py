"""A saved CLIP-MoE folder loads in a fresh process where hf_moe cannot be imported, through
`AutoModel` and `pipeline(..., trust_remote_code=True)`, with outputs identical to the in-process model."""

import json
import textwrap

import numpy as np
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

    folder, workdir = sys.argv[1], sys.argv[2]
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
    run_without_hf_moe(FRESH_PROCESS, [upcycled_dir, tmp_path], tmp_path)

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
