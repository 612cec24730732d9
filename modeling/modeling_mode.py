# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""MoDE (mixture of data experts, seed 001): N CLIP data experts, each trained on the pairs of one coarse caption
cluster, ensembled per task with weights from how close the task's class names lie to the fine cluster centers."""

import torch
from transformers import CLIPModel, CLIPTextModelWithProjection
from transformers.utils import logging


logger = logging.get_logger(__name__)

# How a clustering text encoder turns tokens into one caption embedding. "pooler": BERT's pooler output, which is
# what supervised SimCSE (the paper's encoder) was trained through; "cls" / "mean": the last hidden state's first
# token / attention-masked mean; "clip": CLIP's projected text features.
CLUSTERING_POOLINGS = ("pooler", "cls", "mean", "clip")


def clustering_text_embeddings(
    encoder: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pooling: str = "pooler",
) -> torch.Tensor:
    """The clustering embeddings `(batch, dim)` of tokenised texts, float32 and NOT normalised (MoDE saves them raw
    and L2-normalises at clustering / assignment time).

    `encoder` is a transformers text encoder (e.g. `BertModel`) for the poolings "pooler", "cls" and "mean", and a
    `CLIPModel` or `CLIPTextModelWithProjection` for "clip".
    """
    if pooling not in CLUSTERING_POOLINGS:
        raise ValueError(f"Unknown clustering pooling {pooling!r}; expected one of {CLUSTERING_POOLINGS}.")
    if pooling == "clip":
        if isinstance(encoder, CLIPModel):
            features = encoder.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        elif isinstance(encoder, CLIPTextModelWithProjection):
            features = encoder(input_ids=input_ids, attention_mask=attention_mask).text_embeds
        else:
            raise TypeError(
                "Clustering pooling 'clip' needs a CLIPModel or CLIPTextModelWithProjection, "
                f"got {type(encoder).__name__}."
            )
        return features.float()

    outputs = encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    if pooling == "pooler":
        if getattr(outputs, "pooler_output", None) is None:
            raise ValueError(
                f"Clustering pooling 'pooler' needs an encoder with a pooler; {type(encoder).__name__} returned none "
                "(use pooling 'cls' or 'mean')."
            )
        return outputs.pooler_output.float()
    hidden = outputs.last_hidden_state.float()  # (batch, seq, dim)
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (batch, seq, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
