"""MoDEModel: the task weights equal hand computations of the released and the paper's formulas, the ensembled
logits equal the weighted sum of the individual CLIPs' logits, and the clustering embeddings are the poolings they
claim to be."""

import functools
import math

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from transformers import BertModel, CLIPModel, CLIPProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from hf_moe.modeling import MoDEConfig, MoDEModel, clustering_text_embeddings
from hf_moe.toy import save_toy_clip

from helpers import run_without_hf_moe, save_tiny_bert


@pytest.fixture(scope="module")
def mode_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mode")
    clips = [save_toy_clip(root / f"expert{k}", seed=k) for k in range(3)]
    return clips, save_tiny_bert(root / "bert")


@functools.cache
def load_once(model_class, folder):
    """Each saved tiny model is read once per session; callers only read its weights."""
    return model_class.from_pretrained(folder).eval()


def make_model(clips, bert=None, num_fine: int = 6, formula: str = "released", seed: int = 0) -> MoDEModel:
    experts = [load_once(CLIPModel, clip) for clip in clips]
    encoder = load_once(BertModel, bert) if bert is not None else None
    config = MoDEConfig(
        expert_config=experts[0].config.to_dict(),
        num_experts=len(experts),
        num_fine_clusters=num_fine,
        clustering_encoder_config=None if encoder is None else encoder.config.to_dict(),
        ensemble_formula=formula,
    )
    model = MoDEModel(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for clip, expert in zip(model.experts, experts):
            clip.load_state_dict(expert.state_dict())
        if encoder is not None:
            model.clustering_encoder.load_state_dict(encoder.state_dict())
        dim = config.clustering_dim
        model.fine_centers.copy_(torch.nn.functional.normalize(torch.randn(num_fine, dim, generator=generator), dim=1))
        model.fine_to_coarse.copy_(torch.arange(num_fine) % len(experts))
    return model


def hand_released(embeddings, centers, fine_to_coarse, num_experts):
    """The released formula with plain Python: METHODS.md section 2."""
    rows = [[float(x) for x in row] for row in embeddings]
    rows = [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in rows]
    n = len(rows)
    add = math.exp(0.5 - math.sqrt(n)) if n < 10 else 0.0
    mul = 5 * math.log10(max(10, n - 200))
    scores = [0.0] * num_experts
    for row in rows:
        dists = [math.sqrt(sum((a - float(b)) ** 2 for a, b in zip(row, center))) for center in centers]
        d = min(dists)
        scores[int(fine_to_coarse[dists.index(d)])] += math.exp((add - d) * mul)
    exps = [math.exp(s / 8) for s in scores]
    return [e / sum(exps) for e in exps]


def hand_paper(embeddings, centers, fine_to_coarse, num_experts, lam=0.2):
    """The paper's formula with plain Python: A_ls = exp(-|e_l - e_s|^2 / lambda), only each row's max kept,
    p(c) proportional to exp(sum of the kept A_ls of the centers of expert c)."""
    scores = [0.0] * num_experts
    for row in embeddings:
        row = [float(x) for x in row]
        norm = math.sqrt(sum(v * v for v in row))
        row = [x / norm for x in row]
        affinities = [math.exp(-sum((a - float(b)) ** 2 for a, b in zip(row, c)) / lam) for c in centers]
        best = max(affinities)
        scores[int(fine_to_coarse[affinities.index(best)])] += best
    exps = [math.exp(s) for s in scores]
    return [e / sum(exps) for e in exps]


@pytest.mark.parametrize("num_classes", [3, 12, 230])
def test_released_task_weights_equal_hand_computation(mode_inputs, num_classes):
    clips, bert = mode_inputs
    model = make_model(clips, bert)
    # Class embeddings near the centers, so that the weights are far from uniform and the nearest center matters.
    generator = torch.Generator().manual_seed(num_classes)
    picks = torch.randint(0, 6, (num_classes,), generator=generator)
    embeddings = model.fine_centers[picks] * 3 + 0.3 * torch.randn(num_classes, 16, generator=generator)
    weights = model.task_weights(embeddings)
    expected = hand_released(embeddings, model.fine_centers, model.fine_to_coarse, 3)
    torch.testing.assert_close(weights, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert weights.max() - weights.min() > 1e-3


def test_paper_task_weights_equal_hand_computation(mode_inputs):
    clips, bert = mode_inputs
    model = make_model(clips, bert, formula="paper")
    generator = torch.Generator().manual_seed(1)
    embeddings = model.fine_centers[torch.tensor([0, 3, 1, 4])] + 0.2 * torch.randn(4, 16, generator=generator)
    weights = model.task_weights(embeddings)
    expected = hand_paper(embeddings, model.fine_centers, model.fine_to_coarse, 3)
    torch.testing.assert_close(weights, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert weights.max() - weights.min() > 1e-3


def test_template_averaged_class_embeddings(mode_inputs):
    clips, bert = mode_inputs
    model = make_model(clips, bert)
    per_template = torch.randn(4, 3, 16)  # (classes, templates, dim)
    averaged = torch.nn.functional.normalize(per_template, dim=-1).mean(dim=1)
    torch.testing.assert_close(model.task_weights(per_template), model.task_weights(averaged))
    with pytest.raises(ValueError, match=r"\(num_classes, 16\).*got \(4, 8\)"):
        model.task_weights(torch.randn(4, 8))


def clip_batch(model, num_texts=4, num_images=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.expert_config.text_config.vocab_size
    input_ids = torch.randint(2, vocab, (num_texts, 7), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 0, 1
    size = model.config.expert_config.vision_config.image_size
    return input_ids, torch.randn(num_images, 3, size, size, generator=generator)


def test_ensembled_logits_are_the_weighted_sum_of_the_clips(mode_inputs):
    clips, bert = mode_inputs
    model = make_model(clips, bert)
    references = [CLIPModel.from_pretrained(c).eval() for c in clips]
    with torch.no_grad():  # experts of different logit scales; the ensemble has its own
        for k, (expert, reference) in enumerate(zip(model.experts, references)):
            expert.logit_scale.fill_(2.0 + 0.5 * k)
            reference.logit_scale.fill_(2.0 + 0.5 * k)
        model.logit_scale.fill_(math.log(30.0))
    input_ids, pixel_values = clip_batch(model)
    clustering_ids = torch.randint(5, 40, (4, 5))
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, clustering_input_ids=clustering_ids)
        embeddings = BertModel.from_pretrained(bert).eval()(input_ids=clustering_ids).pooler_output
        weights = model.task_weights(embeddings)
        ref_out = [ref(input_ids=input_ids, pixel_values=pixel_values) for ref in references]
    torch.testing.assert_close(out.task_weights, weights)
    # The released code's ensemble: the weighted sum of the experts' cosine similarities.
    cosines = [ref.logits_per_image / ref_model.logit_scale.exp() for ref, ref_model in zip(ref_out, references)]
    expected = 30.0 * sum(w * cosine for w, cosine in zip(weights, cosines))
    torch.testing.assert_close(out.logits_per_image, expected)
    torch.testing.assert_close(out.logits_per_text, expected.t())
    for k, ref in enumerate(ref_out):
        torch.testing.assert_close(out.expert_logits_per_image[k], ref.logits_per_image, atol=0, rtol=0)

    for k, ref in enumerate(ref_out):  # one-hot weights and the expert's own scale: exactly that CLIP
        one_hot = torch.nn.functional.one_hot(torch.tensor(k), 3).float()
        with torch.no_grad():
            model.logit_scale.copy_(references[k].logit_scale)
            single = model(input_ids=input_ids, pixel_values=pixel_values, task_weights=one_hot)
        torch.testing.assert_close(single.logits_per_image, ref.logits_per_image, atol=0, rtol=0)


def test_one_expert_with_its_own_text_tower_is_that_clip(mode_inputs):
    clips, _ = mode_inputs
    model = make_model(clips[:1])  # no clustering encoder: expert 0's CLIP text features ("clip" pooling)
    assert model.config.clustering_pooling == "clip" and model.clustering_encoder is None
    input_ids, pixel_values = clip_batch(model)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values)
        reference = CLIPModel.from_pretrained(clips[0]).eval()(input_ids=input_ids, pixel_values=pixel_values)
    torch.testing.assert_close(out.task_weights, torch.ones(1))
    torch.testing.assert_close(out.logits_per_image, reference.logits_per_image, atol=0, rtol=0)
    with torch.no_grad():
        as_tuple = model(input_ids=input_ids, pixel_values=pixel_values, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.logits_per_image, atol=0, rtol=0)


def test_per_query_weights_for_text_to_image_retrieval(mode_inputs):
    clips, bert = mode_inputs
    model = make_model(clips, bert)
    input_ids, pixel_values = clip_batch(model, num_texts=3, num_images=4)
    clustering_ids = torch.randint(5, 40, (3, 6))
    with torch.no_grad():
        out = model(input_ids, pixel_values, clustering_input_ids=clustering_ids, per_query_weights=True)
        embeddings = model.clustering_embeddings(clustering_input_ids=clustering_ids)
    assert out.task_weights.shape == (3, 3)
    for j in range(3):
        weights = model.task_weights(embeddings[j : j + 1])  # the query text alone is the task
        torch.testing.assert_close(out.task_weights[j], weights)
        cosines = out.image_embeds @ out.text_embeds[:, j, :, None]  # (E, B_img, 1)
        expected = model.logit_scale.exp() * sum(weights[k] * cosines[k, :, 0] for k in range(3))
        torch.testing.assert_close(out.logits_per_text[j], expected)


def test_clustering_encoder_tokens_are_required(mode_inputs):
    clips, bert = mode_inputs
    model = make_model(clips, bert)
    input_ids, pixel_values = clip_batch(model)
    with pytest.raises(ValueError, match="clustering_input_ids"):
        model(input_ids=input_ids, pixel_values=pixel_values)


def test_clustering_text_embeddings_poolings(mode_inputs):
    clips, bert = mode_inputs
    encoder = BertModel.from_pretrained(bert).eval()
    ids = torch.randint(5, 40, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        out = encoder(input_ids=ids, attention_mask=mask)
        mean = clustering_text_embeddings(encoder, ids, mask, "mean")
        torch.testing.assert_close(clustering_text_embeddings(encoder, ids, mask, "pooler"), out.pooler_output)
        torch.testing.assert_close(clustering_text_embeddings(encoder, ids, mask, "cls"), out.last_hidden_state[:, 0])
        clip = CLIPModel.from_pretrained(clips[0]).eval()
        torch.testing.assert_close(
            clustering_text_embeddings(clip, ids, mask, "clip"),
            clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
        )
    for b, length in enumerate([6, 3]):
        torch.testing.assert_close(mean[b], out.last_hidden_state[b, :length].mean(dim=0))
    with pytest.raises(ValueError, match="'max'"):
        clustering_text_embeddings(encoder, ids, mask, "max")
    with pytest.raises(TypeError, match="BertModel"):
        clustering_text_embeddings(encoder, ids, mask, "clip")


def test_bfloat16_loading_casts_every_expert_and_keeps_the_centers_float32(mode_inputs, tmp_path):
    clips, bert = mode_inputs
    model = make_model(clips[:2], bert)
    model.save_pretrained(tmp_path)
    # The experts' towers are built from configs nested two levels down, which from_pretrained's dtype missed.
    loaded = MoDEModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.fine_centers.dtype == torch.float32  # nearest centers as in float32
    input_ids, pixel_values = clip_batch(model)
    clustering_ids = torch.randint(5, 40, (4, 5))
    with torch.no_grad():
        half = loaded(input_ids, pixel_values.bfloat16(), clustering_input_ids=clustering_ids)
        full = model(input_ids, pixel_values, clustering_input_ids=clustering_ids)
    torch.testing.assert_close(half.task_weights.float(), full.task_weights, atol=2e-2, rtol=0)
    torch.testing.assert_close(half.logits_per_image.float(), full.logits_per_image, atol=0.15, rtol=0.05)


def test_weights_missing_from_a_checkpoint_are_initialised_as_a_fresh_model(mode_inputs, tmp_path):
    clips, _ = mode_inputs
    model = make_model(clips[:2])
    model.save_pretrained(tmp_path)
    state = safetensors.torch.load_file(tmp_path / "model.safetensors")
    kept = {key: value for key, value in state.items() if not key.startswith("experts.1.") and key != "logit_scale"}
    safetensors.torch.save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = MoDEModel.from_pretrained(tmp_path)
    fresh = MoDEModel(model.config)
    assert loaded.logit_scale.item() == pytest.approx(model.config.logit_scale_init_value)
    assert loaded.experts[1].logit_scale.item() == pytest.approx(model.config.expert_config.logit_scale_init_value)
    torch.testing.assert_close(loaded.experts[0].state_dict(), model.experts[0].state_dict(), atol=0, rtol=0)
    # CLIP's own init (attention and MLP stds from the width and depth), not the generic 0.02 std.
    for name, tensor in loaded.experts[1].named_parameters():
        expected = dict(fresh.experts[1].named_parameters())[name]
        if tensor.numel() == 1 or expected.std() == 0:  # constants: norms, biases, logit_scale
            torch.testing.assert_close(tensor, expected, msg=name)
        else:  # random: the same std (a few dozen entries estimate it loosely)
            rel = 0.2 if tensor.numel() > 500 else 0.5
            assert tensor.std().item() == pytest.approx(expected.std().item(), rel=rel), name


def test_forward_returns_the_experts_hidden_states_attentions_and_loss(mode_inputs):
    clips, bert = mode_inputs
    model = make_model(clips[:2], bert)
    model.set_attn_implementation("eager")
    input_ids, pixel_values = clip_batch(model, num_texts=3, num_images=3)
    clustering_ids = torch.randint(5, 40, (3, 5))
    with torch.no_grad():
        out = model(
            input_ids, pixel_values, clustering_input_ids=clustering_ids, output_hidden_states=True,
            output_attentions=True, return_loss=True,
        )  # fmt: skip
        alone = [
            expert(input_ids, pixel_values, output_hidden_states=True, output_attentions=True)
            for expert in model.experts
        ]
        as_tuple = model(input_ids, pixel_values, clustering_input_ids=clustering_ids, return_dict=False)
    for tower in ("text_model_output", "vision_model_output"):
        stacked = getattr(out, tower)
        for field in ("last_hidden_state", "pooler_output", "hidden_states", "attentions"):
            for k, expert_out in enumerate(alone):
                expected = getattr(getattr(expert_out, tower), field)
                got = getattr(stacked, field)
                if isinstance(expected, tuple):
                    assert len(got) == len(expected)
                    for layer, layer_expected in zip(got, expected):
                        torch.testing.assert_close(layer[k], layer_expected, atol=0, rtol=0)
                else:
                    torch.testing.assert_close(got[k], expected, atol=0, rtol=0)
    labels = torch.arange(3)
    expected_loss = (
        torch.nn.functional.cross_entropy(out.logits_per_text, labels)
        + torch.nn.functional.cross_entropy(out.logits_per_image, labels)
    ) / 2
    torch.testing.assert_close(out.loss, expected_loss)
    torch.testing.assert_close(as_tuple[0], out.logits_per_image, atol=0, rtol=0)


def test_features_are_every_experts_as_clip_returns_them(mode_inputs):
    clips, _ = mode_inputs
    model = make_model(clips[:2])
    input_ids, pixel_values = clip_batch(model)
    with torch.no_grad():
        text = model.get_text_features(input_ids=input_ids, output_hidden_states=True)
        image = model.get_image_features(pixel_values=pixel_values)
        text_tuple = model.get_text_features(input_ids=input_ids, return_dict=False)
        for k, expert in enumerate(model.experts):
            clip_text = expert.get_text_features(input_ids=input_ids, output_hidden_states=True)
            clip_image = expert.get_image_features(pixel_values=pixel_values)
            torch.testing.assert_close(text.pooler_output[k], clip_text.pooler_output, atol=0, rtol=0)
            torch.testing.assert_close(text.hidden_states[-1][k], clip_text.hidden_states[-1], atol=0, rtol=0)
            torch.testing.assert_close(image.pooler_output[k], clip_image.pooler_output, atol=0, rtol=0)
            one = model.get_text_features(input_ids=input_ids, expert=k)
            assert type(one) is type(clip_text)
            torch.testing.assert_close(one.pooler_output, clip_text.pooler_output, atol=0, rtol=0)
    assert isinstance(text, BaseModelOutputWithPooling) and isinstance(image, BaseModelOutputWithPooling)
    assert text.pooler_output.shape == (2, 4, model.config.expert_config.projection_dim)
    assert isinstance(text_tuple, tuple)
    torch.testing.assert_close(text_tuple[1], text.pooler_output, atol=0, rtol=0)


def test_experts_implementation_is_accepted_and_ignored(mode_inputs, tmp_path, caplog):
    clips, _ = mode_inputs
    model = make_model(clips[:2])
    model.save_pretrained(tmp_path)
    input_ids, pixel_values = clip_batch(model)
    with torch.no_grad():
        expected = model(input_ids, pixel_values).logits_per_image
        for implementation in ("grouped_mm", "batched_mm"):
            loaded = MoDEModel.from_pretrained(tmp_path, experts_implementation=implementation).eval()
            torch.testing.assert_close(loaded(input_ids, pixel_values).logits_per_image, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not_an_implementation"):
        MoDEModel.from_pretrained(tmp_path, experts_implementation="not_an_implementation")


FROM_PRETRAINED_ARGUMENTS = """
    import json
    import torch
    from PIL import Image
    from transformers import AutoModel, pipeline

    folder, workdir = sys.argv[1], sys.argv[2]
    inputs = torch.load(f"{workdir}/inputs.pt")
    results = {}

    def load(**kwargs):
        return AutoModel.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()

    def logits(model, **extra):
        pixel_values = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            return model(**{**inputs, "pixel_values": pixel_values}, **extra).logits_per_image.float()

    results["fp32"] = logits(load())
    bf16 = load(dtype=torch.bfloat16)
    results["bf16_dtypes"] = sorted({str(p.dtype) for p in bf16.parameters()})
    results["bf16"] = logits(bf16)
    results["device_map"] = logits(load(device_map="auto"))
    for attn in ("eager", "sdpa"):
        model = load(attn_implementation=attn)
        results[attn] = logits(model, output_hidden_states=True, output_attentions=attn == "eager")
        results[f"{attn}_towers"] = sorted({expert.text_model.config._attn_implementation for expert in model.experts})
    results["grouped_mm"] = logits(load(experts_implementation="grouped_mm"))
    # aot_eager: dynamo's capture and AOT autograd of the remote code; inductor adds only codegen (and a minute).
    results["compiled"] = logits(torch.compile(load(), backend="aot_eager"))
    grads = {}
    for checkpointing in (False, True):
        model = load().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            results["checkpointing"] = sorted({m.gradient_checkpointing for m in model.modules()
                                               if hasattr(m, "gradient_checkpointing")})
        model(**inputs, return_loss=True).loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    results["grads"] = grads
    classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    results["pipeline"] = classifier(Image.open(f"{workdir}/image.png"), candidate_labels=["cat", "dog", "car"])
    results["module"] = type(load()).__module__
    assert not any(name.startswith("hf_moe") for name in sys.modules)
    torch.save(results, f"{workdir}/results.pt")
"""


def test_fresh_process_without_hf_moe_takes_the_usual_from_pretrained_arguments(mode_inputs, tmp_path):
    clips, _ = mode_inputs
    folder = tmp_path / "mode"
    model = make_model(clips[:2])
    model.save_pretrained(folder)
    CLIPProcessor.from_pretrained(clips[0]).save_pretrained(folder)  # the "clip" pooling: CLIP's own tokenizer
    input_ids, pixel_values = clip_batch(model, num_texts=3, num_images=3)
    torch.save({"input_ids": input_ids, "pixel_values": pixel_values}, tmp_path / "inputs.pt")
    Image.fromarray((np.random.default_rng(1).random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "image.png")
    run_without_hf_moe(FROM_PRETRAINED_ARGUMENTS, [folder, tmp_path], tmp_path)

    results = torch.load(tmp_path / "results.pt")
    assert results["module"].startswith("transformers_modules")
    with torch.no_grad():
        expected = model(input_ids, pixel_values).logits_per_image
    torch.testing.assert_close(results["fp32"], expected, atol=0, rtol=0)
    assert results["bf16_dtypes"] == ["torch.bfloat16"]
    torch.testing.assert_close(results["bf16"], expected, atol=0.15, rtol=0.05)
    for key in ("device_map", "grouped_mm"):
        torch.testing.assert_close(results[key], expected, atol=0, rtol=0)
    for key in ("eager", "sdpa", "compiled"):
        torch.testing.assert_close(results[key], expected, atol=1e-5, rtol=1e-5)
    assert results["eager_towers"] == ["eager"] and results["sdpa_towers"] == ["sdpa"]
    assert results["checkpointing"] == [True]
    plain, checkpointed = results["grads"][False], results["grads"][True]
    assert plain.keys() == checkpointed.keys() and len(plain) > 100
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
    assert sorted(row["label"] for row in results["pipeline"]) == ["car", "cat", "dog"]
    assert sum(row["score"] for row in results["pipeline"]) == pytest.approx(1.0, abs=1e-4)
