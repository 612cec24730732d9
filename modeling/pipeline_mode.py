# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""MoDE's zero-shot image classification pipeline: transformers' pipeline, with the task weights of the released code.

MoDE weighs its experts per task from where the task's class names fall among the fine cluster centers. The released
code (MetaCLIP `mode/prep_feature.py`) embeds every class name under every prompt template of the task, normalises
each embedding, averages them per class and normalises again before the distances are taken; `hf-moe eval` and
`hf-moe mode report` do the same (`hf_moe.evaluation.class_task_weights`). transformers' pipeline only gives the model
one text per label (`hypothesis_template` filled in), from which `MoDEModel.forward` would weigh the experts; this
pipeline instead computes the weights from the candidate labels under `task_templates` and passes them to the model,
whose experts still score the images against the `hypothesis_template` texts (as every CLIP pipeline does).

`task_templates` (each with one `{}`) is a call argument; by default the model config's `task_templates` (hf-moe's
`build_mode` writes the 8 templates `hf-moe eval` uses by default), and for a config without them the
`hypothesis_template` alone (one template: the weights from the label texts as given).

    classifier = pipeline("zero-shot-image-classification", model=MODE_FOLDER, trust_remote_code=True)
    classifier(image, candidate_labels=["cat", "dog"], task_templates=["a photo of a {}.", "a photo of the {}."])

The saved folder's `config.custom_pipelines` maps the task to this class; transformers loads it from the folder.
"""

from collections import UserDict

import torch
from transformers import ZeroShotImageClassificationPipeline


# Token keys `MoDEModel.clustering_embeddings` takes; the "clip" pooling has no clustering tokens of its own.
CLUSTERING_KEYS = ("input_ids", "attention_mask", "clustering_input_ids", "clustering_attention_mask")


def check_templates(templates) -> list[str]:
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise ValueError("task_templates must hold at least one template.")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"Every task template must contain '{{}}' exactly once; got {template!r}.")
    return templates


class MoDEZeroShotImageClassificationPipeline(ZeroShotImageClassificationPipeline):
    r"""[`ZeroShotImageClassificationPipeline`] for [`MoDEModel`]: the experts' weights come from the candidate labels
    averaged over `task_templates` (the released MoDE code's task weights), the experts' logits from the labels under
    `hypothesis_template`. Extra call argument:

    task_templates (`list[str]`, *optional*): Templates with one `{}` each, every candidate label embedded under
        each of them for the task weights. Default: `model.config.task_templates`, else `[hypothesis_template]`.
    """

    def _sanitize_parameters(self, tokenizer_kwargs=None, **kwargs):
        task_templates = kwargs.pop("task_templates", None)
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(
            tokenizer_kwargs=tokenizer_kwargs, **kwargs
        )
        if task_templates is not None:
            preprocess_params["task_templates"] = check_templates(task_templates)
        return preprocess_params, forward_params, postprocess_params

    def task_templates(self, hypothesis_template: str, task_templates=None) -> list[str]:
        """The templates the task weights average over (see the class docstring for the order of precedence)."""
        if task_templates is None:
            task_templates = getattr(self.model.config, "task_templates", None) or [hypothesis_template]
        return check_templates(task_templates)

    def task_weight_tokens(self, candidate_labels, templates) -> dict:
        """Every label under every template (label-major, as `hf_moe.evaluation.class_task_weights` orders them),
        tokenised for the clustering encoder and truncated to what the experts' text towers take."""
        texts = [template.format(label) for label in candidate_labels for template in templates]
        text_config = self.model.config.expert_config.text_config
        limits = [getattr(self.tokenizer, "model_max_length", None), text_config.max_position_embeddings]
        max_length = min(limit for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000)
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {key: tokens[key] for key in CLUSTERING_KEYS if key in tokens}

    def preprocess(
        self,
        image,
        candidate_labels=None,
        hypothesis_template="This is a photo of {}.",
        timeout=None,
        tokenizer_kwargs=None,
        task_templates=None,
    ):
        inputs = super().preprocess(image, candidate_labels, hypothesis_template, timeout, tokenizer_kwargs)
        templates = self.task_templates(hypothesis_template, task_templates)
        # Wrapped in a list, as the base class wraps its text inputs, so that batching passes the task through whole.
        inputs["task"] = [{"candidate_labels": tuple(candidate_labels), "templates": tuple(templates)}]
        return inputs

    def weights_of_task(self, candidate_labels, templates):
        """The task weights `(num_experts,)` of the labels under the templates: the template-averaged class
        embeddings (`MoDEModel.task_weights` on `(classes, templates, D)`). Within a call the task's weights are kept,
        so that a call on many images embeds its labels x templates once, not once per image."""
        key = (tuple(candidate_labels), tuple(templates))
        if getattr(self, "_task_weights", (None, None))[0] != key:
            tokens = self.task_weight_tokens(candidate_labels, templates)
            tokens = {name: value.to(self.model.device) for name, value in tokens.items()}
            embeddings = self.model.clustering_embeddings(**tokens).float()
            embeddings = embeddings.reshape(len(candidate_labels), len(templates), -1)
            self._task_weights = (key, self.model.task_weights(embeddings.to(self.model.fine_centers.device)))
        return self._task_weights[1]

    def __call__(self, image, candidate_labels=None, **kwargs):
        self._task_weights = (None, None)  # weights are kept within a call only: the model may change between calls
        return super().__call__(image, candidate_labels=candidate_labels, **kwargs)

    def task_weights(self, candidate_labels, task_templates=None, hypothesis_template="This is a photo of {}."):
        """The expert weights this pipeline uses for `candidate_labels` (same defaults as a call)."""
        with torch.inference_mode():
            return self.weights_of_task(candidate_labels, self.task_templates(hypothesis_template, task_templates))

    def _forward(self, model_inputs):
        wrapped = model_inputs.pop("task")
        task = wrapped[0] if isinstance(wrapped[0], dict) else wrapped[0][0]  # batched: one per image
        candidate_labels = model_inputs.pop("candidate_labels")
        text_inputs = model_inputs.pop("text_inputs")
        text_inputs = text_inputs[0] if isinstance(text_inputs[0], UserDict) else text_inputs[0][0]
        task_weights = self.weights_of_task(task["candidate_labels"], task["templates"])
        # The experts score the hypothesis texts; MoDEModel's own weights from them are replaced by the task's.
        text_inputs = {key: value for key, value in text_inputs.items() if not key.startswith("clustering_")}
        outputs = self.model(**text_inputs, **model_inputs, task_weights=task_weights)
        return {"candidate_labels": candidate_labels, "logits": outputs.logits_per_image}


__all__ = ["MoDEZeroShotImageClassificationPipeline"]
