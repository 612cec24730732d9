"""Inputs and small reference implementations shared by the tests."""

import torch


def clip_inputs(config, batch_size: int = 3, seq_len: int = 9, seed: int = 0, pad: int = 0):
    """Random pixels and token ids ending in EOS; the last `pad` tokens of the first row are padding."""
    generator = torch.Generator().manual_seed(seed)
    text, vision = config.text_config, config.vision_config
    pixel_values = torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator)
    input_ids = torch.randint(2, text.vocab_size, (batch_size, seq_len), generator=generator)
    input_ids[:, -1] = text.eos_token_id
    attention_mask = torch.ones_like(input_ids)
    if pad:
        input_ids[0, seq_len - pad - 1] = text.eos_token_id
        input_ids[0, seq_len - pad :] = text.pad_token_id
        attention_mask[0, seq_len - pad :] = 0
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
