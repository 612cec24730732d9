# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""The MoDE tokenizer: the experts' CLIP tokenizer that also tokenizes every text for the clustering encoder.

MoDE weighs its experts by where the task's class names fall among the caption clusters, which were made with a
different text encoder (SimCSE BERT in the paper) and so need that encoder's tokens. Callers that know only one
tokenizer, like `pipeline("zero-shot-image-classification")`, call `tokenizer(texts)` and pass the result to the
model; returning both token sets from one call lets such callers work unchanged. The clustering tokenizer is saved
in the `clustering_tokenizer/` subfolder.
"""

import os

from transformers import AutoTokenizer, CLIPTokenizer
from transformers.utils import logging


logger = logging.get_logger(__name__)

CLUSTERING_TOKENIZER_FOLDER = "clustering_tokenizer"


class MoDETokenizer(CLIPTokenizer):
    r"""[`CLIPTokenizer`] whose `__call__` also returns `clustering_input_ids` and `clustering_attention_mask`: the
    texts tokenised by `clustering_tokenizer` (padded, truncated to `clustering_max_length`), in the same tensor
    type. Everything else is the CLIP tokenizer's."""

    def __init__(self, *args, clustering_tokenizer=None, clustering_max_length: int = 77, **kwargs):
        super().__init__(*args, clustering_max_length=clustering_max_length, **kwargs)
        self.clustering_tokenizer = clustering_tokenizer
        self.clustering_max_length = clustering_max_length

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        tokenizer = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if tokenizer.clustering_tokenizer is None:
            hub_kwargs = {
                key: kwargs[key]
                for key in ("cache_dir", "force_download", "local_files_only", "token", "revision")
                if key in kwargs
            }
            # The subfolder of a local folder is a plain path; of a Hub repo, a `subfolder`.
            local = os.path.join(str(pretrained_model_name_or_path), CLUSTERING_TOKENIZER_FOLDER)
            if os.path.isdir(local):
                tokenizer.clustering_tokenizer = AutoTokenizer.from_pretrained(local, **hub_kwargs)
            else:
                tokenizer.clustering_tokenizer = AutoTokenizer.from_pretrained(
                    pretrained_model_name_or_path, subfolder=CLUSTERING_TOKENIZER_FOLDER, **hub_kwargs
                )
        return tokenizer

    def save_pretrained(self, save_directory, *args, **kwargs):
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        if self.clustering_tokenizer is not None:
            self.clustering_tokenizer.save_pretrained(os.path.join(str(save_directory), CLUSTERING_TOKENIZER_FOLDER))
        return saved

    def __call__(self, text=None, *args, **kwargs):
        encoding = super().__call__(text, *args, **kwargs)
        if text is None or self.clustering_tokenizer is None:
            return encoding
        clustering = self.clustering_tokenizer(
            text,
            padding=True,
            truncation=True,
            max_length=self.clustering_max_length,
            return_tensors=kwargs.get("return_tensors"),
        )
        encoding["clustering_input_ids"] = clustering["input_ids"]
        encoding["clustering_attention_mask"] = clustering["attention_mask"]
        return encoding


MoDETokenizer.register_for_auto_class("AutoTokenizer")


__all__ = ["CLUSTERING_TOKENIZER_FOLDER", "MoDETokenizer"]
