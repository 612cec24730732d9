"""MoDE's zero-shot pipeline weighs the experts as the released code (and `hf-moe eval`) does: each candidate label
averaged over the task's templates (`hf_moe.evaluation.class_task_weights`), in a fresh process without hf_moe; the
experts still score the `hypothesis_template` texts."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_mode_build import write_clusters
from transformers import AutoModel, AutoTokenizer, BertModel, BertTokenizer, CLIPProcessor, pipeline

from hf_moe.conversion import build_mode
from hf_moe.evaluation import DEFAULT_TEMPLATES, class_task_weights
from hf_moe.modeling import clustering_text_embeddings
from hf_moe.toy import save_toy_clip

from helpers import run_without_hf_moe, save_tiny_bert


LABELS = ["cat", "dog", "car"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "art of a {}."]
HYPOTHESIS = "This is a photo of {}."


@pytest.fixture(scope="module")
def mode_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mode_pipeline")
    experts = [save_toy_clip(root / f"expert{k}", seed=k) for k in range(2)]
    bert = save_tiny_bert(root / "bert")
    # Fine centers at single-template texts of the labels, split between the experts, so that which templates the
    # class names are averaged over moves the weights.
    texts = [f"{label}" for label in LABELS] + [HYPOTHESIS.format(label) for label in LABELS]
    tokens = BertTokenizer.from_pretrained(bert)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        embeddings = clustering_text_embeddings(
            BertModel.from_pretrained(bert).eval(), tokens["input_ids"], tokens["attention_mask"], "pooler"
        )
    fine = torch.nn.functional.normalize(embeddings, dim=1)
    clusters = write_clusters(
        root / "clusters", encoder=bert, fine=fine, num_fine=6, fine_to_coarse=torch.tensor([0, 0, 0, 1, 1, 1])
    )
    build_mode(experts, clusters, root / "mode")
    return root / "mode"


def expected_scores(model, processor, image, labels, weights):
    """The model's own ensemble on the hypothesis texts with the given weights, as softmax scores."""
    tokens = processor.tokenizer([HYPOTHESIS.format(label) for label in labels], padding=True, return_tensors="pt")
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=pixel_values,
            task_weights=weights,
        ).logits_per_image[0]
    return dict(zip(labels, logits.softmax(-1).tolist()))


FRESH_PROCESS = """
    import json
    import sys
    import torch
    from PIL import Image
    from transformers import pipeline

    folder, workdir = sys.argv[1], sys.argv[2]
    labels, templates, hypothesis = json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
    classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    image = Image.open(f"{workdir}/image.png")
    out = {
        "class": type(classifier).__name__,
        "module": type(classifier).__module__,
        "weights_default": classifier.task_weights(labels, hypothesis_template=hypothesis).tolist(),
        "weights_given": classifier.task_weights(labels, templates, hypothesis).tolist(),
        "rows_default": classifier(image, candidate_labels=labels, hypothesis_template=hypothesis),
        "rows_given": classifier(
            image, candidate_labels=labels, hypothesis_template=hypothesis, task_templates=templates
        ),
        "rows_batched": classifier([image, image], candidate_labels=labels, hypothesis_template=hypothesis,
                                   task_templates=templates, batch_size=2),
    }
    json.dump(out, open(f"{workdir}/pipeline.json", "w"))
    assert not any(name.startswith("hf_moe") for name in sys.modules)
"""


def test_pipeline_task_weights_are_the_template_averaged_ones_in_a_fresh_process(mode_folder, tmp_path):
    assert (mode_folder / "pipeline_mode.py").is_file()
    model = AutoModel.from_pretrained(mode_folder).eval()
    assert model.config.task_templates == list(DEFAULT_TEMPLATES)
    tokenizer = AutoTokenizer.from_pretrained(mode_folder, trust_remote_code=True)
    processor = CLIPProcessor.from_pretrained(mode_folder)
    processor.tokenizer = tokenizer
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    image.save(tmp_path / "image.png")
    args = [mode_folder, tmp_path, json.dumps(LABELS), json.dumps(TEMPLATES), HYPOTHESIS]
    run_without_hf_moe(FRESH_PROCESS, args, tmp_path)
    remote = json.loads((tmp_path / "pipeline.json").read_text())
    assert remote["class"] == "MoDEZeroShotImageClassificationPipeline"
    assert remote["module"].startswith("transformers_modules")

    for key, templates in (("default", DEFAULT_TEMPLATES), ("given", TEMPLATES)):
        reference = class_task_weights(model, tokenizer, LABELS, templates, progress=False)
        torch.testing.assert_close(torch.tensor(remote[f"weights_{key}"]), reference, atol=1e-6, rtol=0)
        scores = {row["label"]: row["score"] for row in remote[f"rows_{key}"]}
        expected = expected_scores(model, processor, image, LABELS, reference)
        for label in LABELS:
            assert scores[label] == pytest.approx(expected[label], abs=1e-5)
    for rows in remote["rows_batched"]:
        assert {row["label"]: row["score"] for row in rows} == pytest.approx(
            {row["label"]: row["score"] for row in remote["rows_given"]}, abs=1e-6
        )
    # The weights differ from those of the label texts as given (what the model's forward computes from them).
    plain = class_task_weights(model, tokenizer, LABELS, [HYPOTHESIS], progress=False)
    assert not torch.allclose(plain, torch.tensor(remote["weights_default"]), atol=1e-4)


def test_without_configured_templates_the_hypothesis_template_alone_gives_the_weights(mode_folder, tmp_path):
    model = AutoModel.from_pretrained(mode_folder).eval()
    model.config.task_templates = None
    classifier = pipeline(
        "zero-shot-image-classification",
        model=str(mode_folder),
        trust_remote_code=True,
        model_kwargs={"task_templates": None},
    )
    assert classifier.model.config.task_templates is None
    tokenizer = AutoTokenizer.from_pretrained(mode_folder, trust_remote_code=True)
    weights = classifier.task_weights(LABELS, hypothesis_template=HYPOTHESIS)
    torch.testing.assert_close(weights, class_task_weights(model, tokenizer, LABELS, [HYPOTHESIS], progress=False))
    with pytest.raises(ValueError, match="exactly once"):
        classifier(Image.new("RGB", (40, 40)), candidate_labels=LABELS, task_templates=["no placeholder"])


def test_config_refuses_templates_without_one_placeholder():
    from huggingface_hub.errors import StrictDataclassClassValidationError

    from hf_moe.modeling import MoDEConfig

    assert MoDEConfig(task_templates=["a {}."]).task_templates == ["a {}."]
    assert MoDEConfig().custom_pipelines["zero-shot-image-classification"]["impl"].startswith("pipeline_mode.")
    for bad in (["no placeholder"], ["{} and {}"], []):
        with pytest.raises((ValueError, StrictDataclassClassValidationError), match="task_templates"):
            MoDEConfig(task_templates=bad)


def test_a_call_on_many_images_embeds_its_labels_once(mode_folder):
    """The task weights depend on the labels and templates only: a call on several images runs the clustering encoder
    on the labels x templates once (not once per image), and the next call computes them afresh."""
    classifier = pipeline("zero-shot-image-classification", model=str(mode_folder), trust_remote_code=True)
    calls = []
    encode = classifier.model.clustering_embeddings
    classifier.model.clustering_embeddings = lambda *args, **kwargs: calls.append(1) or encode(*args, **kwargs)
    images = [Image.new("RGB", (40, 40), color) for color in ("red", "green", "blue")]
    for batch_size in (1, 2):
        calls.clear()
        rows = classifier(images, candidate_labels=LABELS, task_templates=TEMPLATES, batch_size=batch_size)
        assert len(rows) == 3 and len(calls) == 1
    weights = classifier.task_weights(LABELS, TEMPLATES)
    tokenizer = AutoTokenizer.from_pretrained(mode_folder, trust_remote_code=True)
    torch.testing.assert_close(
        weights, class_task_weights(classifier.model, tokenizer, LABELS, TEMPLATES, progress=False), atol=1e-6, rtol=0
    )
