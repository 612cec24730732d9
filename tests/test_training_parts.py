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


@pytest.fixture(scope="module")
def partial_moe_dir(toy_clip_dir, tmp_path_factory):
    """A CLIP-MoE whose vision tower has a single MoE block, block 1 (so block indices != positions)."""
    from hf_moe.conversion import upcycle_clip

    output = tmp_path_factory.mktemp("partial-moe") / "clip-moe"
    upcycle_clip(toy_clip_dir, output, num_experts=4, top_k=2, seed=0, vision_moe_layers=[1])
    return output


def moe_trainer(model_dir, tmp_path, world_size=None, monkeypatch=None, **args):
    from hf_moe.clip_moe.trainer import CLIPMoETrainer, CLIPMoETrainingArguments
    from hf_moe.modeling import CLIPMoEModel

    if world_size is not None:
        # The number of processes W, as the trainer sees it; the contrastive loss itself stays single-process.
        monkeypatch.setattr(CLIPMoETrainingArguments, "world_size", property(lambda self: world_size))
    model = CLIPMoEModel.from_pretrained(model_dir, experts_implementation="eager")
    args = CLIPMoETrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **args)
    return CLIPMoETrainer(model=model, args=args), model


@pytest.mark.parametrize(
    "setting, world_size, image_weight, text_weight",
    [("paper", 1, 0.01, 0.01), ("paper", 2, 0.01, 0.01), ("official", 1, 0.01, 0.005), ("official", 2, 0.005, 0.0025)],
)
def test_balance_loss_weights_per_tower(
    upcycled_dir, tmp_path, monkeypatch, setting, world_size, image_weight, text_weight
):
    from hf_moe.modeling import load_balancing_loss

    from helpers import clip_inputs

    trainer, model = moe_trainer(
        upcycled_dir, tmp_path, world_size, monkeypatch, balance_loss_weights=setting, logit_scale=None
    )
    model.eval()
    inputs = clip_inputs(model.config, pad=2)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        out = model(**inputs, output_router_logits=True)
    config = model.config
    image_balance = load_balancing_loss(out.vision_router_logits, 4, 2)
    text_balance = load_balancing_loss(out.text_router_logits, 4, 2, inputs["attention_mask"])
    contrastive = clip_contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp(), 0.1)
    assert config.vision_config.router_aux_loss_coef == config.text_config.router_aux_loss_coef == 0.01
    torch.testing.assert_close(loss, contrastive + image_weight * image_balance + text_weight * text_balance)


def test_balance_loss_weights_scale_each_towers_own_coefficient(upcycled_dir, tmp_path):
    from hf_moe.clip_moe.trainer import balance_loss_weights

    assert balance_loss_weights("paper", 0.02, 0.03, 4) == (0.02, 0.03)
    assert balance_loss_weights("official", 0.02, 0.03, 4) == pytest.approx((0.005, 0.00375))
    with pytest.raises(ValueError, match="balance_loss_weights"):
        balance_loss_weights("twice", 0.01, 0.01, 1)


class HostSync(RuntimeError):
    pass


HOST_TRANSFERS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


def forbid_host_sync_outside_the_model(monkeypatch, model):
    """Make every tensor -> Python transfer raise, except inside the model's own forward (transformers' masking
    and expert dispatch are not the trainer's to change)."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_TRANSFERS}
    depth = [0]

    def guarded(name):
        def method(self, *args, **kwargs):
            if not depth[0]:
                raise HostSync(f"Tensor.{name} (a host synchronisation) in the trainer's compute_loss")
            return originals[name](self, *args, **kwargs)

        return method

    for name in HOST_TRANSFERS:
        monkeypatch.setattr(torch.Tensor, name, guarded(name))
    forward = model.forward

    def model_forward(*args, **kwargs):
        depth[0] += 1
        try:
            return forward(*args, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(model, "forward", model_forward)


def test_compute_loss_never_syncs_with_the_host_and_log_reports_per_block_load(partial_moe_dir, tmp_path):
    from hf_moe.modeling import expert_load

    from helpers import clip_inputs

    trainer, model = moe_trainer(partial_moe_dir, tmp_path, logging_steps=2)
    model.train()
    batches = [clip_inputs(model.config, pad=2, seed=seed) for seed in (0, 1)]
    loads = {"vision": [], "text": []}
    for batch in batches:
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
            forbid_host_sync_outside_the_model(patch, model)
            trainer.compute_loss(model, dict(batch))
        torch.manual_seed(0)  # (expert dropout aside, the routing is deterministic)
        with torch.no_grad():
            out = model(**batch, output_router_logits=True)
        loads["vision"].append(expert_load(out.vision_router_logits, 2))
        loads["text"].append(expert_load(out.text_router_logits, 2, batch["attention_mask"]))
    logs = {"loss": 1.0}
    trainer.log(logs)
    load_keys = sorted(key for key in logs if key.startswith("expert_load/"))
    assert load_keys == [
        f"expert_load/{tower}/block_{block}/{stat}"
        for tower, blocks in (("text", (0, 1)), ("vision", (1,)))
        for block in blocks
        for stat in ("max_ratio", "min_ratio")
    ]
    for tower, blocks in (("text", (0, 1)), ("vision", (1,))):
        mean_load = torch.stack(loads[tower]).mean(dim=0)  # (blocks, experts)
        for row, block in enumerate(blocks):
            assert logs[f"expert_load/{tower}/block_{block}/max_ratio"] == pytest.approx(
                mean_load[row].max().item() * 4, abs=1e-5
            )
            assert logs[f"expert_load/{tower}/block_{block}/min_ratio"] == pytest.approx(
                mean_load[row].min().item() * 4, abs=1e-5
            )
    assert {"contrastive_loss", "aux_loss", "router_loss"} <= logs.keys()
    # The sums were consumed: the next log starts afresh.
    later = {"loss": 1.0}
    trainer.log(later)
    assert set(later) <= {"loss", "epoch"}


@pytest.mark.parametrize("mode", ["full", "none"])
def test_expert_load_detail_is_optional(partial_moe_dir, tmp_path, mode):
    from helpers import clip_inputs

    trainer, model = moe_trainer(partial_moe_dir, tmp_path, log_expert_load=mode)
    model.train()
    with torch.no_grad():
        trainer.compute_loss(model, dict(clip_inputs(model.config)))
    logs = {"loss": 1.0}
    trainer.log(logs)
    per_expert = [key for key in logs if "/expert_" in key]
    if mode == "full":
        assert sorted(per_expert) == sorted(
            f"expert_load/{tower}/block_{block}/expert_{e}"
            for tower, blocks in (("text", (0, 1)), ("vision", (1,)))
            for block in blocks
            for e in range(4)
        )
        assert sum(logs[f"expert_load/vision/block_1/expert_{e}"] for e in range(4)) == pytest.approx(1.0, abs=1e-5)
    else:
        assert not [key for key in logs if key.startswith("expert_load/")] and "contrastive_loss" in logs


def test_evaluation_batches_do_not_enter_the_training_log(partial_moe_dir, tmp_path):
    from helpers import clip_inputs

    trainer, model = moe_trainer(partial_moe_dir, tmp_path)
    model.eval()
    with torch.no_grad():
        trainer.compute_loss(model, dict(clip_inputs(model.config)))
    logs = {"loss": 1.0}
    trainer.log(logs)
    assert set(logs) <= {"loss", "epoch"}


def test_recipe_training_arguments_default_to_the_official_values():
    from transformers import HfArgumentParser

    from hf_moe.clip_moe.mcl import MCLArguments
    from hf_moe.clip_moe.train_router import RouterTrainingArguments
    from hf_moe.clip_moe.trainer import CLIPMoERouterTrainingArguments, MCLTrainingArguments

    required = ["--output_dir", "out", "--data", "d"]
    mcl, mcl_training = HfArgumentParser((MCLArguments, MCLTrainingArguments)).parse_args_into_dataclasses(
        ["--base", "b", *required]
    )
    router, router_training = HfArgumentParser(
        (RouterTrainingArguments, CLIPMoERouterTrainingArguments)
    ).parse_args_into_dataclasses(["--model", "m", *required])
    official = [
        (mcl_training, dict(learning_rate=1e-5, weight_decay=0.2)),
        (router_training, dict(learning_rate=1e-6, weight_decay=0.01)),
    ]
    for args, values in official:
        assert args.learning_rate == values["learning_rate"] and args.weight_decay == values["weight_decay"]
        assert args.warmup_steps == 200 and args.lr_scheduler_type == "cosine"
        assert args.num_train_epochs == 1 and args.max_grad_norm == 0
        assert args.balance_loss_weights == "paper" and args.label_smoothing == 0.1 and args.logit_scale == 100
    assert mcl.long_text is True and not mcl.trust_remote_code and not router.trust_remote_code
    no_long, _ = HfArgumentParser((MCLArguments, MCLTrainingArguments)).parse_args_into_dataclasses(
        ["--base", "b", *required, "--no_long_text"]
    )
    assert no_long.long_text is False


def test_mcl_batches_are_reshuffled_every_epoch_through_the_trainer(toy_clip_dir, tmp_path):
    from transformers import AutoProcessor, CLIPModel

    from hf_moe.clip_moe.mcl import MCLStageTrainer
    from hf_moe.clip_moe.trainer import CLIPMoETrainingArguments
    from hf_moe.data import ImageTextCollator, add_index_column, load_image_text_dataset
    from hf_moe.toy_data import save_digit_caption_folder

    dataset = add_index_column(load_image_text_dataset(save_digit_caption_folder(tmp_path / "data", count=16)))
    batches = []

    class RecordingCollator(ImageTextCollator):
        def __call__(self, rows):
            batch = super().__call__(rows)
            batches.append(batch["index"].tolist())
            return batch

    args = CLIPMoETrainingArguments(
        output_dir=str(tmp_path / "run"),
        num_train_epochs=2,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        trainable_parameters=[r"\.mlp\."],
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = MCLStageTrainer(
        model=CLIPModel.from_pretrained(toy_clip_dir),
        args=args,
        train_dataset=dataset,
        data_collator=RecordingCollator(AutoProcessor.from_pretrained(toy_clip_dir)),
        cluster_labels=torch.tensor([0] * 8 + [1] * 8),
    )
    trainer.train()
    assert len(batches) == 8  # 2 clusters x 2 batches, 2 epochs
    first, second = batches[:4], batches[4:]
    assert first != second  # the epoch reached the sampler: a new shuffle
    # Both epochs still hold every sample once, each batch from one cluster.
    for epoch in (first, second):
        assert sorted(i for batch in epoch for i in batch) == list(range(16))
        assert all(len({i // 8 for i in batch}) == 1 for batch in epoch)
