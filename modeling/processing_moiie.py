# Copyright 2026 The hf-moe authors. Licensed under the Apache License, Version 2.0.
"""MoIIE processor: a SigLIP image processor and a Phi-3 / Llama tokenizer. Every image placeholder in the text
becomes the image's number of tokens, and `token_type_ids` mark those tokens (1) apart from text (0), which is how
the MoIIE decoder routes vision tokens and language tokens to their experts."""

from transformers.processing_utils import ProcessorMixin


# Phi-3 chat format; message content is a string or a list of {"type": "image"} / {"type": "text", "text": ...}.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Llama-3 chat format (header ids, <|eot_id|> ends each turn), with the same image items.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# The chat template a MoIIE processor gets when its tokenizer has none, by decoder (`text_config.model_type`).
CHAT_TEMPLATES = {"phi3": DEFAULT_CHAT_TEMPLATE, "llama": LLAMA3_CHAT_TEMPLATE}


def num_image_tokens_of(vision_config) -> int:
    """Tokens per image of a vision config: its `num_image_tokens`, else `(image_size // patch_size) ** 2`."""
    count = getattr(vision_config, "num_image_tokens", None)
    if count is None:
        count = (vision_config.image_size // vision_config.patch_size) ** 2
    return int(count)


class MoIIEProcessor(ProcessorMixin):
    r"""Image processor + tokenizer + chat template for MoIIE models.

    Args:
        image_processor: A SigLIP image processor (any image processor returning `pixel_values`).
        tokenizer: A tokenizer holding `image_token` as one (special) token.
        num_image_tokens (`int`, *optional*): Tokens per image; when unset, `(height // patch_size) *
            (width // patch_size)` of the processed image. Use `num_image_tokens_of(model.config.vision_config)`.
        patch_size (`int`, *optional*): The vision tower's patch size (used only without `num_image_tokens`).
        image_token (`str`, defaults to `"<image>"`): The placeholder; its id must be the model's `image_token_id`.
        chat_template (`str`, *optional*): Defaults to the tokenizer's, else a Phi-3 template with `<image>` lines for
            image items (`CHAT_TEMPLATES[text_config.model_type]` has the one for each decoder).

    Returns (`__call__`): `input_ids`, `attention_mask`, `token_type_ids` (1 at image tokens) and, with images,
    `pixel_values`; the placeholders must match the images in number, else a `ValueError`.
    """

    return_mm_token_type_ids = True

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        patch_size=None,
        image_token="<image>",
        chat_template=None,
        **kwargs,
    ):
        if num_image_tokens is None and patch_size is None:
            raise ValueError("MoIIEProcessor needs num_image_tokens or patch_size to expand image placeholders.")
        self.num_image_tokens = num_image_tokens
        self.patch_size = patch_size
        self.image_token = image_token
        ids = tokenizer.encode(image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"The tokenizer must encode image_token {image_token!r} as one token, got ids {ids}.")
        self.image_token_id = ids[0]
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def tokens_per_image(self, height: int, width: int) -> int:
        if self.num_image_tokens is not None:
            return self.num_image_tokens
        return (height // self.patch_size) * (width // self.patch_size)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        height, width = image_inputs["pixel_values"][image_idx].shape[-2:]
        return self.image_token * self.tokens_per_image(int(height), int(width))

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if images is not None and text is not None and not isinstance(text, str):
            # an explicit message for the most common mistake, before the generic count check
            from transformers.image_utils import make_flat_list_of_images

            placeholders, given = (
                sum(sample.count(self.image_token) for sample in text),
                len(make_flat_list_of_images(images)),
            )
            if placeholders != given:
                raise ValueError(
                    f"The text holds {placeholders} image placeholder(s) {self.image_token!r} but {given} image(s) "
                    "were given; put one placeholder where each image goes."
                )
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        outputs = super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)
        if "mm_token_type_ids" in outputs:
            outputs["token_type_ids"] = outputs.pop("mm_token_type_ids")
        return outputs

    @property
    def model_input_names(self):
        names = list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))
        return names + ["token_type_ids"] if "token_type_ids" not in names else names


MoIIEProcessor.register_for_auto_class()

__all__ = ["CHAT_TEMPLATES", "LLAMA3_CHAT_TEMPLATE", "MoIIEProcessor", "num_image_tokens_of"]
