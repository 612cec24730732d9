# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""The model card of a folder stays with the model it describes.

`save_pretrained` writes only config, weights and code, and `push_to_hub` (or `save_pretrained(push_to_hub=True)`)
uploads transformers' generic card ("automatically generated", no base model, no license) to a repo that has no
README yet. A model loaded from a folder (or a Hub repo in the local cache) whose card says how it was built should
carry that card on: `save_pretrained` copies it when the target has none, and an upload replaces the generic card
with it, keeping the tags transformers added.
"""

import os
import shutil

from transformers.utils import logging
from transformers.utils.hub import ModelCard, try_to_load_from_cache


logger = logging.get_logger(__name__)

CARD_NAME = "README.md"
# The sentence of the card `transformers.utils.hub.create_and_tag_model_card` writes when the repo has none.
GENERIC_CARD_MARK = "This model card has been automatically generated."


class KeepModelCardMixin:
    """Put first among a `PreTrainedModel`'s bases."""

    def _source_model_card(self) -> str | None:
        """The card of the folder or cached Hub repo this model was loaded from, if any."""
        source = str(getattr(self.config, "_name_or_path", "") or "")
        if not source:
            return None
        if os.path.isdir(source):
            path = os.path.join(source, CARD_NAME)
            return path if os.path.isfile(path) else None
        try:
            path = try_to_load_from_cache(source, CARD_NAME)
        except Exception:  # not a repo id: nothing to carry on
            return None
        return path if isinstance(path, str) and os.path.isfile(path) else None

    def save_pretrained(self, save_directory, *args, **kwargs):
        card = self._source_model_card()
        super().save_pretrained(save_directory, *args, **kwargs)
        target = os.path.join(save_directory, CARD_NAME)
        if card is not None and os.path.isdir(save_directory) and not os.path.exists(target):
            shutil.copyfile(card, target)

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        target = os.path.join(working_dir, CARD_NAME)
        card = self._source_model_card()
        if card is not None and os.path.isfile(target):
            with open(target, encoding="utf-8") as handle:
                generic = GENERIC_CARD_MARK in handle.read()
            if generic:  # the repo has no card yet: upload ours, with the tags transformers would have set
                _replace_card(target, card)
        return super()._upload_modified_files(working_dir, *args, **kwargs)


def _replace_card(target: str, source: str) -> None:
    tags = ModelCard.load(target).data.tags or []
    card = ModelCard.load(source)
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    card.save(target)
    logger.info(f"Uploading the model card of the loaded model ({source}) instead of a generic one.")
