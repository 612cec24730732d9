"""The CLIP contrastive loss as CLIP-MoE and MCL train with it: features all-gathered across processes WITH
gradient, local rows scored against all gathered columns, label smoothing, both directions."""

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `tensor` from every process (gradients flow back to each process' own rows) and return it with
    this process' rank; a no-op outside distributed training."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor)), dist.get_rank()


def clip_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch.

    Args:
        image_embeds, text_embeds: `(local_batch, dim)` L2-normalised features of this process.
        logit_scale: the multiplier of the cosine similarities (already exponentiated, e.g. 100).
    """
    all_images, rank = gather_with_grad(image_embeds)
    all_texts, _ = gather_with_grad(text_embeds)
    batch = image_embeds.shape[0]
    targets = torch.arange(rank * batch, rank * batch + batch, device=image_embeds.device)
    logits_image_to_text = logit_scale * image_embeds @ all_texts.T  # (local, global)
    logits_text_to_image = logit_scale * text_embeds @ all_images.T
    return (
        F.cross_entropy(logits_image_to_text, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_text_to_image, targets, label_smoothing=label_smoothing)
    ) / 2
