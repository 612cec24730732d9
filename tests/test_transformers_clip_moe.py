"""transformers' own generic model tests (`ModelTesterMixin`, `ConfigTester`) on the CLIP-MoE and WEMoE classes.

The testers are ours, modelled on transformers' CLIP testers (tests/models/clip/test_modeling_clip.py, not in the
sdist): the same tiny sizes and inputs, the same skips, each with transformers' reason. transformers' own
CLIPVisionModel / CLIPTextModel / CLIPModel run through the same testers as controls: a generic test that fails on a
control is an artefact of our tester, not a defect of the model.

Time: the whole set (controls and the fp16 / bf16 cases of the dtype-parametrised tests included) takes many minutes
on 2 CPU cores, so by default the suite runs our classes with the fp32 cases; `HF_MOE_TRANSFORMERS_TESTS=full` runs
everything.
"""

import re
import unittest

import numpy as np
import pytest
import safetensors.torch
import torch
from parameterized import parameterized
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from transformers.testing_utils import is_flaky
from transformers_suite import FULL, FULL_ONLY, CLIPJointSkips, CLIPTrainingSkips, import_common

from hf_moe.modeling import (
    CLIPMoEConfig,
    CLIPMoEModel,
    CLIPMoETextConfig,
    CLIPMoETextModel,
    CLIPMoETextModelWithProjection,
    CLIPMoEVisionConfig,
    CLIPMoEVisionModel,
    CLIPMoEVisionModelWithProjection,
    WEMoECLIPModel,
    WEMoECLIPVisionModel,
    WEMoECLIPVisionModelWithProjection,
    WEMoEConfig,
    WEMoEVisionConfig,
)


common = import_common("test_modeling_common")
ModelTesterMixin = common.ModelTesterMixin
ConfigTester = import_common("test_configuration_common").ConfigTester

# intermediate_size 40, not CLIP's 37: grouped_mm's kernels need 16-byte rows, and at 37 our experts run batched_mm
# instead (tests/test_moe_core.py), which test_eager_matches_batched_and_grouped_inference counts as a wrong dispatch.
CLIP_MOE = {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 40}
WE_MOE = {"num_tasks": 3, "router_depth": 2}
# transformers' CLIP testers use 12 samples and 30x30 images; 4 samples of 12x12 (37 tokens) test the same paths in
# a fraction of the time on 2 CPU cores.
BATCH_SIZE = 4


class VisionTester:
    """transformers' CLIPVisionModelTester: a 2-layer, 32-wide tower on images in 2x2 patches."""

    def __init__(self, parent, config_class, extra=None, batch_size=BATCH_SIZE):
        self.parent, self.config_class, self.extra = parent, config_class, dict(extra or {})
        self.batch_size, self.image_size, self.patch_size, self.num_channels = batch_size, 12, 2, 3
        self.hidden_size, self.projection_dim, self.num_hidden_layers = 32, 32, 2
        self.num_attention_heads, self.intermediate_size = 4, 37
        self.is_training = True
        self.seq_length = (self.image_size // self.patch_size) ** 2 + 1  # patches + [CLS]

    def get_config(self):
        kwargs = dict(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            projection_dim=self.projection_dim,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            dropout=0.1,
            attention_dropout=0.1,
            initializer_range=0.02,
        )
        return self.config_class(**{**kwargs, **self.extra})

    def prepare_config_and_inputs(self):
        shape = [self.batch_size, self.num_channels, self.image_size, self.image_size]
        return self.get_config(), common.floats_tensor(shape)

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class TextTester:
    """transformers' CLIPTextModelTester: a 2-layer, 32-wide tower on 7 tokens of a 99-token vocabulary, right
    padding at a random length per row."""

    def __init__(self, parent, config_class, extra=None, batch_size=BATCH_SIZE):
        self.parent, self.config_class, self.extra = parent, config_class, dict(extra or {})
        self.batch_size, self.seq_length, self.vocab_size = batch_size, 7, 99
        self.hidden_size, self.projection_dim, self.num_hidden_layers = 32, 32, 2
        self.num_attention_heads, self.intermediate_size, self.max_position_embeddings = 4, 37, 512
        self.is_training = True

    def get_config(self):
        kwargs = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            projection_dim=self.projection_dim,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            dropout=0.1,
            attention_dropout=0.1,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=0.02,
        )
        return self.config_class(**{**kwargs, **self.extra})

    def prepare_config_and_inputs(self):
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        mask = torch.zeros(self.batch_size, self.seq_length, dtype=torch.long)
        for row, length in enumerate(np.random.randint(1, self.seq_length - 1, size=(self.batch_size,))):
            mask[row, :length] = 1
        return self.get_config(), input_ids, mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": mask}


class JointTester:
    """transformers' CLIPModelTester: both towers' testers, projection_dim 64, the contrastive loss asked for."""

    def __init__(self, parent, config_class, text_config_class, vision_config_class, text_extra=None, vision_extra=None,
                 return_loss=True):  # fmt: skip
        self.parent, self.config_class, self.return_loss = parent, config_class, return_loss
        self.text_model_tester = TextTester(parent, text_config_class, text_extra)
        self.vision_model_tester = VisionTester(parent, vision_config_class, vision_extra)
        self.batch_size = self.text_model_tester.batch_size
        self.is_training = True

    def get_config(self):
        return self.config_class(
            text_config=self.text_model_tester.get_config().to_dict(),
            vision_config=self.vision_model_tester.get_config().to_dict(),
            projection_dim=64,
        )

    def prepare_config_and_inputs_for_common(self):
        _, input_ids, mask = self.text_model_tester.prepare_config_and_inputs()
        _, pixel_values = self.vision_model_tester.prepare_config_and_inputs()
        inputs = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values}
        if self.return_loss:
            inputs["return_loss"] = True
        return self.get_config(), inputs


class CLIPFamilyTests(CLIPTrainingSkips, ModelTesterMixin):
    """The skips transformers' CLIP testers make (each with transformers' reason)."""

    test_resize_embeddings = False
    has_packed_experts = True

    def setUp(self):
        if not FULL and re.search(r"_(fp16|bf16)(_|$)", self._testMethodName):
            self.skipTest(f"the half-precision case {FULL_ONLY}")
        if self._testMethodName.startswith("test_eager_matches_batched_and_grouped"):
            if not self.has_packed_experts:
                # WEMoE accepts experts_implementation (every family does), but has no experts it could dispatch.
                self.skipTest("WEMoE has no packed experts: experts_implementation is accepted and changes nothing")
            if self._is_composite:
                # CLIP never reaches it (no experts). It compares `logits` / `last_hidden_state`, which a contrastive
                # output has not, and casts every input, `return_loss=True` included, as a tensor.
                self.skipTest("the test reads outputs a CLIP joint model has not; the towers' testers run it")
        self.setUpTester()

    # transformers' CLIP testers mark it flaky (retried): half-precision attention differs a little between eager and
    # sdpa, and for MoE blocks such a difference can flip a token's top-k choice.
    @parameterized.expand(common.TEST_EAGER_MATCHES_SDPA_INFERENCE_PARAMETERIZATION)
    @is_flaky()
    def test_eager_matches_sdpa_inference(self, *args):
        return getattr(ModelTesterMixin, self._testMethodName)(self)


class VisionTests(CLIPFamilyTests):
    config_class = vision_extra = None

    def setUpTester(self):
        self.model_tester = VisionTester(self, self.config_class, self.vision_extra)
        self.config_tester = ConfigTester(
            self, config_class=self.config_class, has_text_modality=False, hidden_size=37, num_attention_heads=1
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="CLIP does not use inputs_embeds")
    def test_inputs_embeds(self):
        pass

    def test_model_get_set_embeddings(self):
        # transformers' CLIP vision override: the patch embedding is the input embedding, no output embedding.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            self.assertIsNone(model.get_output_embeddings())

    def test_model_shapes(self):
        config, pixel_values = self.model_tester.prepare_config_and_inputs()
        tester = self.model_tester
        for model_class in self.all_model_classes:
            with torch.no_grad():
                result = model_class(config).eval()(pixel_values)
            self.assertEqual(result.last_hidden_state.shape, (tester.batch_size, tester.seq_length, tester.hidden_size))
            if "WithProjection" in model_class.__name__:
                self.assertEqual(result.image_embeds.shape, (tester.batch_size, tester.projection_dim))
            else:
                self.assertEqual(result.pooler_output.shape, (tester.batch_size, tester.hidden_size))


class TextTests(CLIPFamilyTests):
    config_class = text_extra = None
    model_split_percents = [0.5, 0.8, 0.9]

    def setUpTester(self):
        self.model_tester = TextTester(self, self.config_class, self.text_extra)
        self.config_tester = ConfigTester(self, config_class=self.config_class, hidden_size=37, num_attention_heads=1)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="CLIP does not use inputs_embeds")
    def test_inputs_embeds(self):
        pass

    def test_sdpa_can_dispatch_on_flash(self):
        self.skipTest(reason="CLIPTextModel has two attention masks: `causal_attention_mask` and `attention_mask`")

    def test_model_shapes(self):
        config, input_ids, mask = self.model_tester.prepare_config_and_inputs()
        tester = self.model_tester
        for model_class in self.all_model_classes:
            with torch.no_grad():
                result = model_class(config).eval()(input_ids, attention_mask=mask)
            self.assertEqual(result.last_hidden_state.shape, (tester.batch_size, tester.seq_length, tester.hidden_size))
            if "WithProjection" in model_class.__name__:
                self.assertEqual(result.text_embeds.shape, (tester.batch_size, tester.projection_dim))


class JointTests(CLIPJointSkips, CLIPFamilyTests):
    config_class = text_config_class = vision_config_class = None
    text_extra = vision_extra = None
    additional_model_inputs = ["pixel_values"]
    test_attention_outputs = False
    _is_composite = True

    def setUpTester(self):
        self.model_tester = JointTester(
            self, self.config_class, self.text_config_class, self.vision_config_class, self.text_extra,
            self.vision_extra,
        )  # fmt: skip
        self.config_tester = ConfigTester(
            self, config_class=self.config_class, has_text_modality=False,
            common_properties=["projection_dim", "logit_scale_init_value"],
        )  # fmt: skip

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_shapes(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        batch = self.model_tester.batch_size
        for model_class in self.all_model_classes:
            with torch.no_grad():
                result = model_class(config).eval()(**inputs)
            self.assertEqual(result.logits_per_image.shape, (batch, batch))
            self.assertEqual(result.logits_per_text.shape, (batch, batch))


# transformers' classes through our testers: the controls.
class CLIPVisionControlTest(VisionTests, unittest.TestCase):
    all_model_classes = (CLIPVisionModel, CLIPVisionModelWithProjection)
    config_class = CLIPVisionConfig


class CLIPTextControlTest(TextTests, unittest.TestCase):
    all_model_classes = (CLIPTextModel, CLIPTextModelWithProjection)
    config_class = CLIPTextConfig


class CLIPModelControlTest(JointTests, unittest.TestCase):
    all_model_classes = (CLIPModel,)
    config_class, text_config_class, vision_config_class = CLIPConfig, CLIPTextConfig, CLIPVisionConfig


class CLIPMoEVisionTest(VisionTests, unittest.TestCase):
    all_model_classes = (CLIPMoEVisionModel, CLIPMoEVisionModelWithProjection)
    config_class, vision_extra = CLIPMoEVisionConfig, CLIP_MOE


class CLIPMoETextTest(TextTests, unittest.TestCase):
    all_model_classes = (CLIPMoETextModel, CLIPMoETextModelWithProjection)
    config_class, text_extra = CLIPMoETextConfig, CLIP_MOE


class CLIPMoEModelTest(JointTests, unittest.TestCase):
    all_model_classes = (CLIPMoEModel,)
    config_class, text_config_class, vision_config_class = CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig
    text_extra = vision_extra = CLIP_MOE


class WEMoEVisionTest(VisionTests, unittest.TestCase):
    has_packed_experts = False
    all_model_classes = (WEMoECLIPVisionModel, WEMoECLIPVisionModelWithProjection)
    config_class, vision_extra = WEMoEVisionConfig, WE_MOE


class WEMoESharedRouterVisionTest(VisionTests, unittest.TestCase):
    has_packed_experts = False
    all_model_classes = (WEMoECLIPVisionModel, WEMoECLIPVisionModelWithProjection)
    config_class, vision_extra = WEMoEVisionConfig, {**WE_MOE, "shared_router": True}


class WEMoEModelTest(JointTests, unittest.TestCase):
    has_packed_experts = False
    all_model_classes = (WEMoECLIPModel,)
    config_class, text_config_class, vision_config_class = WEMoEConfig, CLIPTextConfig, WEMoEVisionConfig
    vision_extra = WE_MOE


# Defects the generic tests and the findings showed, each checked on its own.


def _tiny_joint(model_class):
    if model_class is CLIPMoEModel:
        return JointTester(None, CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig, CLIP_MOE, CLIP_MOE).get_config()
    return JointTester(None, WEMoEConfig, CLIPTextConfig, WEMoEVisionConfig, vision_extra=WE_MOE).get_config()


@pytest.mark.parametrize("model_class", [CLIPMoEModel, WEMoECLIPModel])
def test_weights_missing_from_a_checkpoint_are_initialised_as_in_a_fresh_model(model_class, tmp_path):
    config = _tiny_joint(model_class)
    model_class(config).save_pretrained(tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    dropped = [key for key in weights if key == "logit_scale" or key.startswith("text_model.") and "proj" in key]
    safetensors.torch.save_file(
        {key: value for key, value in weights.items() if key not in dropped}, tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )  # fmt: skip
    loaded, fresh = model_class.from_pretrained(tmp_path), model_class(config)
    assert loaded.logit_scale.item() == pytest.approx(np.log(1 / 0.07), abs=1e-4)  # uninitialised memory before
    for key in dropped:
        if key != "logit_scale":  # CLIP's init, not the generic N(0, 0.02) it got before
            std, expected = loaded.get_parameter(key).std().item(), fresh.get_parameter(key).std().item()
            assert std == pytest.approx(expected, rel=0.3), key


@pytest.mark.parametrize("model_class", [CLIPMoEModel, WEMoECLIPModel])
def test_a_fresh_model_gets_clips_init(model_class):
    # transformers skipped the init of parameter-less containers (CLIP's attention) in code outside its package.
    config = _tiny_joint(model_class)
    torch.manual_seed(0)
    model, reference = model_class(config), CLIPModel(CLIPConfig(**config.to_dict()))
    for tower in ("text_model", "vision_model"):
        for name in ("self_attn.q_proj.weight", "self_attn.out_proj.weight"):
            key = f"{tower}.encoder.layers.0.{name}"
            assert model.get_parameter(key).std().item() == pytest.approx(
                reference.get_parameter(key).std().item(), rel=0.25
            ), key


def test_we_moe_accepts_every_experts_implementation(tmp_path):
    config = _tiny_joint(WEMoECLIPModel)
    torch.manual_seed(0)
    WEMoECLIPModel(config).save_pretrained(tmp_path)
    tester = JointTester(None, WEMoEConfig, CLIPTextConfig, WEMoEVisionConfig, return_loss=False)
    _, inputs = tester.prepare_config_and_inputs_for_common()
    with torch.no_grad():
        expected = WEMoECLIPModel.from_pretrained(tmp_path).eval()(**inputs).logits_per_image
        for implementation in ("eager", "batched_mm", "grouped_mm"):
            model = WEMoECLIPModel.from_pretrained(tmp_path, experts_implementation=implementation).eval()
            torch.testing.assert_close(model(**inputs).logits_per_image, expected, atol=0, rtol=0)
            model.set_experts_implementation("grouped_mm")
