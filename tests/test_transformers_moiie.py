"""transformers' own generic tests (`ModelTesterMixin`, `ConfigTester`, generation) on MoIIE: `MoIIEModel` and the
Phi-3 / Llama causal LMs, with transformers' LLaVA through the same tester as the control.

The tester is modelled on transformers' LLaVA tester (tests/models/llava/test_modeling_llava.py): a tiny SigLIP
tower, a tiny decoder, one image per row whose placeholder tokens open the sequence. Skips are only those
transformers' LLaVA tester has (with its reason) and what cannot run on a CPU. The decoder's intermediate size is 40,
not LLaVA's 37: torch's CPU grouped_mm (transformers' default experts implementation) wants 16-byte rows, and at 37
transformers' own Mixtral fails the same way ("strides should be multiple of 16 bytes").

Generation: the causal LMs go through tests/transformers_stand_ins/generation_tester.py, hf-moe's stand-in for
transformers' `GenerationTesterMixin` (greedy / sample / beam search / beam sample with their dict outputs, assisted and
prompt-lookup decoding, left padding, the cache's format and continuing from it, `inputs_embeds` with `pixel_values`,
the static cache, the streamer), with LLaVA as the control: over its Llama decoder (the full tester) and over MoIIE's
default Phi-3 decoder (the generation checks only).

Time: each class takes minutes on 2 CPU cores, so by default the suite runs MoIIEModel, the Phi-3 causal LM and the
LLaVA controls with the fp32 cases; `HF_MOE_TRANSFORMERS_TESTS=full` adds the half-precision cases and the Llama causal
LM (tests/test_moiie_llama.py covers it by default).
"""

import copy
import re
import unittest

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaModel
from transformers_suite import FULL, FULL_ONLY, import_common

from hf_moe.modeling import MoIIEConfig, MoIIELlamaForCausalLM, MoIIEModel, MoIIEPhi3ForCausalLM


common = import_common("test_modeling_common")
ModelTesterMixin, floats_tensor, ids_tensor = common.ModelTesterMixin, common.floats_tensor, common.ids_tensor
ConfigTester = import_common("test_configuration_common").ConfigTester
GenerationTesterMixin = import_common("generation.test_utils").GenerationTesterMixin

LLAVA_GC_REASON = (
    "transformers skips it for LLaVA: This architecture seems to not compute gradients properly when using GC, "
    "check: https://github.com/huggingface/transformers/pull/27124"
)
LLAVA_FA2_REASON = (
    "transformers skips it for LLaVA: VLMs need lots of steps to prepare images/mask correctly to get pad-free "
    "inputs. Can be tested as part of LLM test"
)


class VisionLanguageTester:
    """Tiny config + inputs (LLaVA tester's shape): `batch_size` rows of `seq_length` text tokens after
    `num_image_tokens` placeholders of one 8x8 image in 2x2 patches."""

    def __init__(self, parent, text_model_type="phi3", family="moiie"):
        self.parent = parent
        self.family = family
        self.text_model_type = text_model_type
        self.batch_size, self.num_channels, self.is_training = 3, 3, True
        self.vocab_size, self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 99, 32, 2, 4
        self.image_token_id, self.pad_token_id = 3, 1
        self.vision_config = dict(
            model_type="siglip_vision_model", image_size=8, patch_size=2, num_channels=3, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, initializer_range=0.02,
        )  # fmt: skip
        self.text_config = dict(
            model_type=text_model_type, vocab_size=self.vocab_size, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=40, hidden_act="silu",
            max_position_embeddings=512, initializer_range=0.02, pad_token_id=self.pad_token_id, bos_token_id=0,
            eos_token_id=2,
        )  # fmt: skip
        self.num_image_tokens = (8 // 2) ** 2
        self.seq_length = 7 + self.num_image_tokens
        self.encoder_seq_length = self.seq_length

    def get_config(self):
        if self.family == "llava":
            return LlavaConfig(
                text_config=self.text_config, vision_config=self.vision_config, image_token_id=self.image_token_id,
                vision_feature_select_strategy="full", vision_feature_layer=-1, image_seq_length=self.num_image_tokens,
            )  # fmt: skip
        return MoIIEConfig(
            text_config=self.text_config, vision_config=self.vision_config, image_token_id=self.image_token_id,
            vision_feature_layer=-1, moe_layers=[1], num_vision_experts=1, num_shared_experts=2,
            num_language_experts=1, num_experts_per_tok=2,
        )  # fmt: skip

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, 8, 8])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 4) + 4
        input_ids[:, : self.num_image_tokens] = self.image_token_id
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long)
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


class VisionLanguageTestMixin(ModelTesterMixin, GenerationTesterMixin):
    _is_composite = True
    family, text_model_type, config_class = "moiie", "phi3", MoIIEConfig

    def setUp(self):
        if not FULL and re.search(r"_(fp16|bf16)(_|$)", self._testMethodName):
            self.skipTest(f"the half-precision case {FULL_ONLY}")
        self.model_tester = VisionLanguageTester(self, self.text_model_type, self.family)
        self.config_tester = ConfigTester(
            self, config_class=self.config_class, has_text_modality=False,
            common_properties=["image_token_id", "vision_feature_layer"],
        )  # fmt: skip

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_mismatching_num_image_tokens(self):
        """As transformers' LLaVA test: fewer images than image blocks raise; two rows with one image each run."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            inputs_now = copy.deepcopy(inputs)
            model(**inputs_now)
            inputs_now["pixel_values"] = inputs_now["pixel_values"][-1:]
            with self.assertRaises((RuntimeError, ValueError)):
                model(**inputs_now)
            input_ids = torch.cat([inputs_now["input_ids"][:1]] * 2)
            with self.assertRaises((RuntimeError, ValueError)):
                model(input_ids=input_ids, pixel_values=inputs_now["pixel_values"][:1])
            model(input_ids=input_ids, pixel_values=torch.cat([inputs_now["pixel_values"][:1]] * 2))

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        # transformers adds causal-LM labels by class name from its static mappings (LLaVA's is there, ours cannot be).
        if return_labels and model_class in self.all_generative_model_classes and "labels" not in inputs:
            inputs["labels"] = torch.zeros_like(inputs["input_ids"])
        return inputs

    def test_training(self):
        # transformers leaves the base model out (no loss) by looking it up in its static MODEL_MAPPING_NAMES, which
        # holds LlavaModel but not a model registered with `AutoModel.register`: leave it out the same way.
        self.all_model_classes = self.all_generative_model_classes
        super().test_training()

    @unittest.skip(reason=LLAVA_GC_REASON)
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip(reason=LLAVA_GC_REASON)
    def test_training_gradient_checkpointing_use_reentrant(self):
        pass

    @unittest.skip(reason=LLAVA_GC_REASON)
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass

    @unittest.skip(reason=LLAVA_GC_REASON)
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass

    @unittest.skip(reason=LLAVA_FA2_REASON)
    def test_flash_attention_2_padding_matches_padding_free_with_position_ids(self):
        pass


class LlavaControlTest(VisionLanguageTestMixin, unittest.TestCase):
    """transformers' LLaVA (Llama decoder) through the same tester: a failure here is the tester's, not MoIIE's."""

    family, text_model_type, config_class = "llava", "llama", LlavaConfig
    all_model_classes = (LlavaModel, LlavaForConditionalGeneration)
    all_generative_model_classes = (LlavaForConditionalGeneration,)


class LlavaPhi3GenerationControlTest(GenerationTesterMixin, unittest.TestCase):
    """transformers' LLaVA over a Phi-3 decoder (MoIIE's default) through the same generation checks as
    `MoIIEPhi3Test`: a failure here is the generation tester's, not MoIIE's."""

    has_attentions = True
    all_generative_model_classes = (LlavaForConditionalGeneration,)

    def setUp(self):
        self.model_tester = VisionLanguageTester(self, "phi3", "llava")


class MoIIEPhi3Test(VisionLanguageTestMixin, unittest.TestCase):
    all_model_classes = (MoIIEModel, MoIIEPhi3ForCausalLM)
    all_generative_model_classes = (MoIIEPhi3ForCausalLM,)


@unittest.skipUnless(FULL, f"the Llama decoder's run {FULL_ONLY}; tests/test_moiie_llama.py covers it by default")
class MoIIELlamaTest(VisionLanguageTestMixin, unittest.TestCase):
    text_model_type = "llama"
    all_model_classes = (MoIIEModel, MoIIELlamaForCausalLM)
    all_generative_model_classes = (MoIIELlamaForCausalLM,)
