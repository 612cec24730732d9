"""Pieces of the CLIP-MoE training recipe: k-means, MCL's joint labels and cluster batches, the all-gathered
contrastive loss (checked across two real processes), and freezing."""

import logging
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from hf_moe.clip_moe.mcl import ClusterBatchSampler, joint_cluster_labels
from hf_moe.clustering import kmeans
from hf_moe.losses import clip_contrastive_loss


def blobs(centers: torch.Tensor, per_cluster: int, spread: float = 0.05, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    points = torch.cat([c + spread * torch.randn(per_cluster, centers.shape[1], generator=generator) for c in centers])
    return points, torch.arange(len(centers)).repeat_interleave(per_cluster)


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_recovers_separated_clusters_and_matches_sklearn_inertia():
    from sklearn.cluster import KMeans

    points, truth = blobs(torch.randn(5, 8) * 3, per_cluster=40)
    labels, centers = kmeans(points, 5, seed=0)
    assert same_partition(labels, truth)
    inertia = (points - centers[labels]).square().sum().item()
    reference = KMeans(5, n_init=10, random_state=0).fit(points.numpy()).inertia_
    assert inertia == pytest.approx(reference, rel=1e-3)


def test_kmeans_rejects_more_clusters_than_points():
    with pytest.raises(ValueError, match="num_clusters=4"):
        kmeans(torch.randn(3, 2), 4)


def test_joint_labels_are_three_times_text_plus_image():
    image, image_truth = blobs(torch.eye(3) * 4, per_cluster=10)
    text_truth = torch.tensor([0, 1, 2]).repeat(10)  # text clusters cut across image clusters
    text = (torch.eye(3) * 4)[text_truth] + 0.05 * torch.randn(30, 3)
    labels = joint_cluster_labels(image, text, 3, 3)
    assert same_partition(labels, 3 * text_truth + image_truth)
    assert labels.max() < 9 and len(labels.unique()) == 9


def test_cluster_batches_are_homogeneous_across_processes(caplog):
    labels = torch.tensor([0] * 37 + [1] * 20 + [2] * 5 + [3] * 16)
    with caplog.at_level(logging.WARNING):
        samplers = [ClusterBatchSampler(labels, batch_size=4, num_replicas=2, rank=r, seed=1) for r in range(2)]
    assert "Skipping 1 clusters" in caplog.text and "2: 5" in caplog.text
    batches = [list(s) for s in samplers]
    assert len(batches[0]) == len(batches[1]) == len(samplers[0]) == 37 // 8 + 20 // 8 + 16 // 8
    seen = set()
    for rank0, rank1 in zip(*batches):
        global_batch = rank0 + rank1
        assert len(rank0) == len(rank1) == 4
        assert len(set(labels[global_batch].tolist())) == 1  # one cluster per global batch
        assert not seen & set(global_batch)
        seen |= set(global_batch)
    assert not any(labels[i] == 2 for i in seen)  # the too-small cluster never appears


def test_cluster_sampler_refuses_when_no_cluster_fills_a_batch():
    with pytest.raises(ValueError, match="lower the batch size"):
        ClusterBatchSampler(torch.tensor([0, 0, 1, 1]), batch_size=3)


def reference_contrastive(image, text, scale, smoothing):
    logits = scale * image @ text.T
    targets = torch.arange(len(image))
    return (
        F.cross_entropy(logits, targets, label_smoothing=smoothing)
        + F.cross_entropy(logits.T, targets, label_smoothing=smoothing)
    ) / 2


def embeddings(batch=8, dim=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    return image, text


def test_contrastive_loss_single_process_matches_reference():
    image, text = embeddings()
    torch.testing.assert_close(
        clip_contrastive_loss(image, text, 100.0, 0.1), reference_contrastive(image, text, 100.0, 0.1)
    )


def _distributed_worker(rank: int, world_size: int, port: int, results: dict):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    image, text = embeddings()
    local = slice(rank * 4, rank * 4 + 4)
    image_local = image[local].clone().requires_grad_(True)
    text_local = text[local].clone().requires_grad_(True)
    loss = clip_contrastive_loss(image_local, text_local, 100.0, 0.1)
    loss.backward()
    results[rank] = (loss.item(), image_local.grad.clone(), text_local.grad.clone())
    dist.destroy_process_group()


def test_contrastive_loss_gathers_features_with_gradient_across_two_processes():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_distributed_worker, args=(2, port, results), nprocs=2, join=True)

    image, text = embeddings()
    image.requires_grad_(True)
    text.requires_grad_(True)
    full = reference_contrastive(image, text, 100.0, 0.1)
    full.backward()
    # The global loss is the mean of the per-process losses...
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(full.item(), rel=1e-5)
    # ...and each process' features receive the gradient of the sum of all processes' losses.
    for rank in range(2):
        torch.testing.assert_close(results[rank][1] / 2, image.grad[rank * 4 : rank * 4 + 4], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(results[rank][2] / 2, text.grad[rank * 4 : rank * 4 + 4], atol=1e-6, rtol=1e-5)


def test_feature_extraction_reuses_finished_shards(toy_clip_dir, tmp_path):
    from transformers import AutoProcessor, CLIPModel

    from hf_moe.clip_moe.mcl import extract_features
    from hf_moe.data import ImageTextCollator, load_image_text_dataset
    from hf_moe.toy_data import save_digit_caption_folder

    dataset = load_image_text_dataset(save_digit_caption_folder(tmp_path / "data", count=20))
    collator = ImageTextCollator(AutoProcessor.from_pretrained(toy_clip_dir))
    model = CLIPModel.from_pretrained(toy_clip_dir)
    image, text = extract_features(model, dataset, collator, tmp_path / "features", batch_size=3, shard_size=8)
    shards = sorted((tmp_path / "features").glob("shard-*.safetensors"))
    assert len(shards) == 3 and image.shape == (20, model.config.projection_dim)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(20))
    with torch.no_grad():
        batch = collator([dataset[i] for i in range(20)])
        expected = F.normalize(model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output, dim=-1)
    torch.testing.assert_close(image, expected, atol=1e-5, rtol=1e-5)
    # An interrupted run: one shard missing. Only it is recomputed (by a changed model, to tell them apart).
    shards[1].unlink()
    with torch.no_grad():
        for parameter in model.visual_projection.parameters():
            parameter.mul_(-1)
    image2, _ = extract_features(model, dataset, collator, tmp_path / "features", batch_size=3, shard_size=8)
    torch.testing.assert_close(image2[:8], image[:8])
    torch.testing.assert_close(image2[8:16], -image[8:16], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image2[16:], image[16:])


def test_trainer_loss_is_contrastive_plus_weighted_balance_and_z_losses(upcycled_dir, tmp_path):
    from hf_moe.clip_moe.trainer import CLIPMoETrainer, CLIPMoETrainingArguments
    from hf_moe.modeling import CLIPMoEModel, router_z_loss

    from helpers import clip_inputs

    model = CLIPMoEModel.from_pretrained(upcycled_dir, router_z_loss_coef=0.5).eval()
    args = CLIPMoETrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = CLIPMoETrainer(model=model, args=args)
    inputs = clip_inputs(model.config, pad=2)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        out = model(**inputs, output_router_logits=True)
    z_loss = router_z_loss(out.vision_router_logits) + router_z_loss(out.text_router_logits, inputs["attention_mask"])
    expected = clip_contrastive_loss(out.image_embeds, out.text_embeds, 100.0, 0.1) + 0.01 * out.aux_loss + 0.5 * z_loss
    torch.testing.assert_close(loss, expected)
