"""`build_mode` / `hf-moe mode build`: a built folder is one MoDE model whose zero-shot pipeline ensembles the experts
with weights from the candidate labels, in this process and in a fresh one without hf_moe; bad inputs are refused
with the file, key or value named and nothing written."""

import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer, BertModel, BertTokenizer, CLIPModel, CLIPProcessor, pipeline

from hf_moe.conversion import build_mode
from hf_moe.mode.build import main
from hf_moe.modeling import MoDEModel, clustering_text_embeddings
from hf_moe.toy import save_toy_clip

from helpers import run_without_hf_moe, save_tiny_bert


LABEL_SETS = [["cat", "dog", "car"], ["red ship", "blue bird"]]


def write_clusters(
    folder, dim=16, num_fine=6, num_experts=2, encoder="bert", pooling="pooler", fine_to_coarse=None, fine=None
):
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    if fine is None:
        fine = torch.nn.functional.normalize(torch.randn(num_fine, dim, generator=generator), dim=1)
    if fine_to_coarse is None:
        fine_to_coarse = torch.arange(num_fine) % num_experts
    centers = {
        "fine_centers": fine,
        "coarse_centers": torch.randn(num_experts, dim, generator=generator),
        "fine_to_coarse": fine_to_coarse,
    }
    save_file(centers, folder / "centers.safetensors")
    info = {
        "num_fine_clusters": num_fine,
        "num_experts": num_experts,
        "encoder": {"name_or_path": str(encoder), "pooling": pooling, "max_length": 32},
        "seed": 0,
    }
    (folder / "clusters.json").write_text(json.dumps(info))
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("mode_build")
    experts = [save_toy_clip(root / f"expert{k}", seed=k) for k in range(2)]
    bert = save_tiny_bert(root / "bert")
    # Fine centers at the clustering embeddings of the pipeline's texts of LABEL_SETS[0] (expert 0) and
    # LABEL_SETS[1] (expert 1), so that the two label sets weigh the experts clearly differently.
    tokens = BertTokenizer.from_pretrained(bert)(
        [f"This is a photo of {label}." for labels in LABEL_SETS for label in labels], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        encoder = BertModel.from_pretrained(bert).eval()
        embeddings = clustering_text_embeddings(encoder, tokens["input_ids"], tokens["attention_mask"], "pooler")
    fine = torch.cat([torch.nn.functional.normalize(embeddings, dim=1), torch.ones(1, 16) / 4])
    fine_to_coarse = torch.tensor([0, 0, 0, 1, 1, 1])
    clusters = write_clusters(root / "clusters", encoder=bert, fine=fine, fine_to_coarse=fine_to_coarse)
    main([*map(str, experts), "--clusters", str(clusters), "--output_dir", str(root / "mode")])
    return root, experts, bert, clusters, root / "mode"


def test_built_folder_is_the_experts_centers_and_encoder(built):
    root, experts, bert, clusters, folder = built
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "configuration_mode.py", "modeling_mode.py", "tokenization_mode.py"} <= names
    assert {"README.md", "clustering_tokenizer"} <= names and names & {
        "processor_config.json",
        "preprocessor_config.json",
    }
    model = AutoModel.from_pretrained(folder).eval()
    assert isinstance(model, MoDEModel) and model.config.clustering_pooling == "pooler"
    for k, expert in enumerate(experts):
        reference = CLIPModel.from_pretrained(expert).state_dict()
        for key, value in model.experts[k].state_dict().items():
            torch.testing.assert_close(value, reference[key], atol=0, rtol=0)
    bert_state = BertModel.from_pretrained(bert).state_dict()
    for key, value in model.clustering_encoder.state_dict().items():
        torch.testing.assert_close(value, bert_state[key], atol=0, rtol=0)
    torch.testing.assert_close(model.fine_to_coarse, torch.tensor([0, 0, 0, 1, 1, 1]))
    scales = torch.stack([CLIPModel.from_pretrained(expert).logit_scale.exp() for expert in experts])
    torch.testing.assert_close(model.logit_scale.exp(), scales.mean())
    card = (folder / "README.md").read_text()
    assert str(experts[0]) in card and str(experts[1]) in card


def pipeline_expectation(model, tokenizer, processor, image, labels):
    sequences = [f"This is a photo of {label}." for label in labels]
    tokens = tokenizer(sequences, padding=True, return_tensors="pt")
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeddings = model.clustering_embeddings(
            clustering_input_ids=tokens["clustering_input_ids"],
            clustering_attention_mask=tokens["clustering_attention_mask"],
        )
        weights = model.task_weights(embeddings)
        experts = [clip(input_ids=tokens["input_ids"], pixel_values=pixel_values) for clip in model.experts]
    logits = sum(w * out.logits_per_image[0] for w, out in zip(weights, experts))
    return weights, dict(zip(labels, logits.softmax(-1).tolist()))


def test_pipeline_weights_come_from_the_candidate_labels(built):
    root, experts, bert, clusters, folder = built
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    processor = CLIPProcessor.from_pretrained(experts[0])
    classifier = pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    weights = []
    for labels in LABEL_SETS:
        # The weights from the labels under the hypothesis template alone (as pipeline_expectation computes them).
        rows = classifier(image, candidate_labels=labels, task_templates=["This is a photo of {}."])
        result = {row["label"]: row["score"] for row in rows}
        task_weights, expected = pipeline_expectation(model, tokenizer, processor, image, labels)
        assert result.keys() == expected.keys()
        for label in labels:
            assert result[label] == pytest.approx(expected[label], abs=1e-6)
        weights.append(task_weights)
    assert weights[0][0] > 0.7 and weights[1][1] > 0.7


FRESH_PROCESS = textwrap.dedent(
    """
    import json
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoTokenizer, pipeline

    folder, workdir = sys.argv[1], sys.argv[2]
    try:
        import hf_moe  # noqa: F401
        raise SystemExit("hf_moe was importable")
    except ImportError:
        pass
    inputs = torch.load(f"{workdir}/inputs.pt")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    tokens = tokenizer(["a photo of a cat", "a dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    torch.save({"logits": out.logits_per_image, "weights": out.task_weights, "class": type(model).__name__,
                "module": type(model).__module__, "tokens": dict(tokens)}, f"{workdir}/outputs.pt")
    classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    result = classifier(Image.open(f"{workdir}/image.png"), candidate_labels=["cat", "dog", "car"])
    json.dump(result, open(f"{workdir}/pipeline.json", "w"))
    assert not any(name.startswith("hf_moe") for name in sys.modules)
    """
)


def test_fresh_process_without_hf_moe_loads_model_tokenizer_and_pipeline(built, tmp_path):
    root, experts, bert, clusters, folder = built
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    size = model.config.expert_config.vision_config.image_size
    inputs = dict(tokenizer(["a red car", "this is a photo of a bird"], padding=True, return_tensors="pt"))
    inputs["pixel_values"] = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    torch.save(inputs, tmp_path / "inputs.pt")
    image = Image.fromarray((np.random.default_rng(1).random((40, 40, 3)) * 255).astype(np.uint8))
    image.save(tmp_path / "image.png")
    run_without_hf_moe(FRESH_PROCESS, [folder, tmp_path], tmp_path)

    remote = torch.load(tmp_path / "outputs.pt")
    assert remote["class"] == "MoDEModel" and remote["module"].startswith("transformers_modules")
    with torch.no_grad():
        local = model(**inputs)
    torch.testing.assert_close(remote["logits"], local.logits_per_image, atol=0, rtol=0)
    torch.testing.assert_close(remote["weights"], local.task_weights, atol=0, rtol=0)
    local_tokens = tokenizer(["a photo of a cat", "a dog"], padding=True, return_tensors="pt")
    assert remote["tokens"].keys() == local_tokens.keys()
    for key in local_tokens:
        torch.testing.assert_close(remote["tokens"][key], local_tokens[key], atol=0, rtol=0)
    classifier = pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)
    local_result = classifier(Image.open(tmp_path / "image.png"), candidate_labels=["cat", "dog", "car"])
    assert json.loads((tmp_path / "pipeline.json").read_text()) == json.loads(json.dumps(local_result))


def test_clip_clustering_encoder_keeps_a_plain_clip_tokenizer(built, tmp_path):
    root, experts, bert, clusters, folder = built
    clip_clusters = write_clusters(tmp_path / "clusters", dim=32, encoder=experts[0], pooling="clip")
    out = tmp_path / "mode"
    model = build_mode(experts, clip_clusters, out, ensemble_formula="paper")
    assert model.config.ensemble_formula == "paper"
    assert type(AutoTokenizer.from_pretrained(out)).__name__ == "CLIPTokenizer"
    input_ids = torch.tensor([[0, 40, 50, 1], [0, 60, 1, 1]])
    with torch.no_grad():
        embeddings = model.clustering_embeddings(input_ids, torch.ones_like(input_ids))
        reference = CLIPModel.from_pretrained(experts[0]).eval()
        expected = reference.get_text_features(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    torch.testing.assert_close(embeddings, expected.pooler_output)
    classifier = pipeline("zero-shot-image-classification", model=str(out), trust_remote_code=True)
    assert {row["label"] for row in classifier(Image.new("RGB", (40, 40)), candidate_labels=["a", "b"])} == {"a", "b"}


@pytest.mark.parametrize(
    "case, match",
    [
        ("count", r"3 expert\(s\) given but .*clusters.json has 'num_experts' 2"),
        ("architecture", r"differs in architecture .*hidden_size: 32 vs 48"),
        ("dim", r"'fine_centers' have dim 8 but the clustering encoder .* embeds in 16"),
        ("fine_to_coarse", r"'fine_to_coarse' holds \[5\], outside the 2 experts"),
        ("missing", r"centers.safetensors is missing"),
        ("pooling", r"'encoder.pooling' is 'max'"),
    ],
)
def test_bad_inputs_are_refused_and_nothing_written(built, tmp_path, case, match):
    root, experts, bert, clusters, folder = built
    experts = list(experts)
    if case == "count":
        experts.append(experts[0])
    if case == "architecture":
        experts[1] = save_toy_clip(tmp_path / "wide", seed=1, hidden_size=48)
    kwargs = {"encoder": bert}
    kwargs.update(
        {"dim": {"dim": 8}, "fine_to_coarse": {"fine_to_coarse": torch.tensor([0, 1, 0, 5, 0, 1])}}.get(case, {})
    )
    bad = write_clusters(tmp_path / "clusters", **kwargs)
    if case == "missing":
        (bad / "centers.safetensors").unlink()
    if case == "pooling":
        info = json.loads((bad / "clusters.json").read_text())
        info["encoder"]["pooling"] = "max"
        (bad / "clusters.json").write_text(json.dumps(info))
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        build_mode(experts, bad, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
