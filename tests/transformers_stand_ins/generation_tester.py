"""hf-moe's stand-in for transformers' tests/generation/test_utils.py (not in the sdist).

`ModelTesterMixin` needs the class to exist (it checks which testers inherit it); a tester that inherits it gets the
decoder-only / VLM part of transformers' `GenerationTesterMixin`: the same test names and, where the API of the
installed transformers allows, the same assertions (this transformers calls the KV cache `cache`, where the mixin's
code says `past_key_values`; its Cache holds `layers[i].keys` / `.values`). Each test's docstring names the test it
stands in for. Left out: encoder-decoder branches (head masking), the decoding methods this transformers moved to the
Hub (contrastive, DoLa, group / constrained beam search), what needs a GPU or several (offloaded cache, FA2, model-
parallel beam search), a compiler (`test_generate_compile_model_forward`), optimum-quanto (quantized cache), the slow
eager-vs-SDPA generation, and `test_prompt_lookup_decoding_stops_at_eos` (it tests the candidate generator, no model).
Where this file departs from transformers' test, the docstring says how and why.
"""

import inspect

import torch
from parameterized import parameterized
from transformers.cache_utils import Cache, StaticCache
from transformers.generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from transformers.generation.streamers import BaseStreamer


# The inputs that carry images: generation needs them once (prefill), not when continuing from a cache that holds them.
IMAGE_INPUTS = ("pixel_values", "pixel_values_videos", "pixel_values_images", "image_sizes")


def _cache_of(output):
    """The KV cache of a model / generate output (`cache` in this transformers, `past_key_values` before)."""
    for key in ("cache", "past_key_values"):
        if key in output and output[key] is not None:
            return output[key]
    return None


def _layer_kv(cache, layer_idx):
    if isinstance(cache, Cache):
        layer = cache.layers[layer_idx]
        return layer.keys, layer.values
    return cache[layer_idx]


class GenerationTesterMixin:
    input_name = "input_ids"
    model_tester = None
    all_generative_model_classes = ()
    max_new_tokens = 3

    def _generative_classes(self):
        classes = getattr(self, "all_generative_model_classes", ()) or self.all_model_classes
        return [cls for cls in classes if hasattr(cls, "generate") and cls.can_generate()]

    def _model_with_attentions(self, model_class, config):
        """The model in eval mode, with eager attention where the test asks for attention weights (as transformers'
        common tests build it: SDPA returns none)."""
        if self.has_attentions:
            return model_class._from_config(config, attn_implementation="eager").eval()
        return model_class(config).eval()

    def prepare_config_and_inputs_for_generate(self, batch_size=2):
        """As transformers': the common inputs cut to `batch_size` rows, without labels / use_cache, and no EOS (so
        that length checks hold)."""
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        input_keys_to_ignore = ["head_mask", "decoder_input_ids", "decoder_attention_mask", "use_cache", "labels"]
        filtered_inputs_dict = {
            k: v[:batch_size, ...] if isinstance(v, torch.Tensor) else v
            for k, v in inputs_dict.items()
            if k not in input_keys_to_ignore
        }
        text_gen_config = config.get_text_config(decoder=True)
        if text_gen_config.eos_token_id is not None and text_gen_config.pad_token_id is None:
            eos = text_gen_config.eos_token_id
            text_gen_config.pad_token_id = eos if isinstance(eos, int) else eos[0]
        text_gen_config.eos_token_id = None
        text_gen_config.forced_eos_token_id = None
        return config, filtered_inputs_dict

    def _check_similar_generate_outputs(self, output_1, output_2, atol=1e-5, rtol=1e-5):
        """As transformers': the same sequences, or equal scores up to the first mismatch."""
        decoder_input_length = output_1.sequences.shape[1] - len(output_1.scores)
        output_matches = output_1.sequences == output_2.sequences
        has_matching_outputs = output_matches.all()
        has_matching_scores = None
        if not has_matching_outputs:
            for batch_idx in range(output_1.sequences.shape[0]):
                batch_matches = output_matches[batch_idx]
                if batch_matches.all():
                    continue
                first_mismatch_idx = batch_matches.int().argmin() - decoder_input_length
                has_matching_scores = torch.allclose(
                    output_1.scores[first_mismatch_idx][batch_idx],
                    output_2.scores[first_mismatch_idx][batch_idx],
                    rtol=rtol,
                    atol=atol,
                )
                if not has_matching_scores:
                    break
        self.assertTrue(has_matching_outputs or has_matching_scores)

    def _get_logits_processor_kwargs(self, do_sample=False, config=None):
        logits_processor_kwargs = {"bad_words_ids": [[1, 0]], "repetition_penalty": 1.2, "remove_invalid_values": True}
        if do_sample:
            logits_processor_kwargs.update({"top_k": 10, "top_p": 0.7, "temperature": 0.7})
        # As transformers: a VLM must not generate its image token (a random model would otherwise crash on it).
        if config is not None:
            for key in ["image_token_index", "image_token_id", "video_token_index", "video_token_id"]:
                token_index = getattr(config, key, None)
                if token_index is None and self.model_tester is not None:
                    token_index = getattr(self.model_tester, key, None)
                if token_index is not None and token_index < config.get_text_config().vocab_size:
                    logits_processor_kwargs["bad_words_ids"].append([token_index])
        return logits_processor_kwargs

    def _get_beam_kwargs(self, num_return_sequences=1):
        return {
            "early_stopping": False,
            "length_penalty": 2.0,
            "num_beams": 2,
            "num_return_sequences": num_return_sequences,
        }

    def _generate(self, model, inputs_dict, do_sample, extra=None, seed=None, **flags):
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = {
            "do_sample": do_sample,
            "max_new_tokens": self.max_new_tokens,
            "output_scores": flags.get("output_scores", False),
            "output_logits": flags.get("output_logits", False),
            "output_attentions": flags.get("output_attentions", False),
            "output_hidden_states": flags.get("output_hidden_states", False),
            "return_dict_in_generate": flags.get("return_dict_in_generate", False),
            "use_cache": flags.get("use_cache", True),
            **(extra or {}),
            **self._get_logits_processor_kwargs(do_sample=do_sample, config=model.config),
        }
        with torch.no_grad():
            return model.generate(**kwargs, **inputs_dict)

    def _greedy_generate(self, model, inputs_dict, **flags):
        return self._generate(model, inputs_dict, do_sample=False, extra={"num_beams": 1}, **flags)

    def _sample_generate(self, model, inputs_dict, num_return_sequences, **flags):
        extra = {"num_beams": 1, "num_return_sequences": num_return_sequences}
        return self._generate(model, inputs_dict, do_sample=True, extra=extra, seed=0, **flags)

    def _beam_search_generate(self, model, inputs_dict, beam_kwargs, **flags):
        return self._generate(model, inputs_dict, do_sample=False, extra=beam_kwargs, **flags)

    def _beam_sample_generate(self, model, inputs_dict, beam_kwargs, **flags):
        return self._generate(model, inputs_dict, do_sample=True, extra=beam_kwargs, seed=0, **flags)

    def _dict_flags(self, use_cache):
        return {
            "output_scores": True,
            "output_logits": True,
            "output_hidden_states": True,
            "output_attentions": self.has_attentions,
            "return_dict_in_generate": True,
            "use_cache": use_cache,
        }

    def _assert_length(self, sequences, inputs_dict):
        self.assertEqual(sequences.shape[-1], self.max_new_tokens + inputs_dict["input_ids"].shape[-1])

    # --- greedy, sample, beam search, beam sample -------------------------------------------------------------------

    def test_greedy_generate(self):
        """Stands in for transformers' `test_greedy_generate`."""
        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = model_class(config).eval()
            output_generate = self._greedy_generate(model=model, inputs_dict=inputs_dict)
            self._assert_length(output_generate, inputs_dict)

    def test_greedy_generate_dict_outputs(self):
        """Stands in for transformers' `test_greedy_generate_dict_outputs`."""
        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = self._model_with_attentions(model_class, config)
            output_generate = self._greedy_generate(model, inputs_dict, **self._dict_flags(use_cache=False))
            self._assert_length(output_generate.sequences, inputs_dict)
            self.assertIsInstance(output_generate, GenerateDecoderOnlyOutput)
            self._check_outputs(output_generate, model.config)

    def test_greedy_generate_dict_outputs_use_cache(self):
        """Stands in for transformers' `test_greedy_generate_dict_outputs_use_cache`."""
        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = self._model_with_attentions(model_class, config)
            output_generate = self._greedy_generate(model, inputs_dict, **self._dict_flags(use_cache=True))
            self._assert_length(output_generate.sequences, inputs_dict)
            self._check_outputs(output_generate, model.config, use_cache=True)

    def test_greedy_generate_with_and_without_cache(self):
        """hf-moe's own (no transformers test of that name): greedy decoding with the KV cache equals greedy decoding
        without it, token for token (transformers checks it per model in its integration tests)."""
        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = model_class(config).eval()
            cached = self._greedy_generate(model, inputs_dict, use_cache=True)
            uncached = self._greedy_generate(model, inputs_dict, use_cache=False)
            self._assert_length(cached, inputs_dict)
            self.assertTrue(torch.equal(cached, uncached), model_class.__name__)

    def test_sample_generate(self):
        """Stands in for transformers' `test_sample_generate`, with what its earlier versions checked too (generate
        with a seed equals the sampling loop with that seed): two runs with the same seed give the same tokens, and
        `num_return_sequences` multiplies the rows."""
        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = model_class(config).eval()
            output_generate = self._sample_generate(model=model, inputs_dict=inputs_dict, num_return_sequences=1)
            self._assert_length(output_generate, inputs_dict)
            again = self._sample_generate(model=model, inputs_dict=inputs_dict, num_return_sequences=1)
            self.assertListEqual(output_generate.tolist(), again.tolist())
            several = self._sample_generate(model=model, inputs_dict=inputs_dict, num_return_sequences=2)
            self.assertEqual(several.shape[0], 2 * inputs_dict["input_ids"].shape[0])
            self._assert_length(several, inputs_dict)

    def test_sample_generate_dict_output(self):
        """Stands in for transformers' `test_sample_generate_dict_output`."""
        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = self._model_with_attentions(model_class, config)
            output_generate = self._sample_generate(
                model, inputs_dict, num_return_sequences=2, **self._dict_flags(use_cache=False)
            )
            self._assert_length(output_generate.sequences, inputs_dict)
            self.assertIsInstance(output_generate, GenerateDecoderOnlyOutput)
            self._check_outputs(output_generate, model.config, num_return_sequences=2)

    def test_beam_search_generate(self):
        """Stands in for transformers' `test_beam_search_generate` (plus `num_return_sequences=2`: two rows each)."""
        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = model_class(config).eval()
            output_generate = self._beam_search_generate(model, inputs_dict, beam_kwargs=self._get_beam_kwargs())
            self._assert_length(output_generate, inputs_dict)
            several = self._beam_search_generate(model, inputs_dict, beam_kwargs=self._get_beam_kwargs(2))
            self.assertEqual(several.shape[0], 2 * inputs_dict["input_ids"].shape[0])

    def test_beam_search_generate_dict_output(self):
        """Stands in for transformers' `test_beam_search_generate_dict_output`."""
        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = self._model_with_attentions(model_class, config)
            beam_kwargs = self._get_beam_kwargs()
            output_generate = self._beam_search_generate(
                model, inputs_dict, beam_kwargs=beam_kwargs, **self._dict_flags(use_cache=False)
            )
            self._assert_length(output_generate.sequences, inputs_dict)
            self.assertIsInstance(output_generate, GenerateBeamDecoderOnlyOutput)
            self._check_outputs(
                output_generate, model.config, num_return_sequences=beam_kwargs["num_return_sequences"],
                num_beams=beam_kwargs["num_beams"],
            )  # fmt: skip

    def test_beam_search_generate_dict_outputs_use_cache(self):
        """Stands in for transformers' `test_beam_search_generate_dict_outputs_use_cache`."""
        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = self._model_with_attentions(model_class, config)
            beam_kwargs = self._get_beam_kwargs()
            output_generate = self._beam_search_generate(
                model, inputs_dict, beam_kwargs=beam_kwargs, **self._dict_flags(use_cache=True)
            )
            self._assert_length(output_generate.sequences, inputs_dict)
            self._check_outputs(
                output_generate, model.config, use_cache=True,
                num_return_sequences=beam_kwargs["num_return_sequences"], num_beams=beam_kwargs["num_beams"],
            )  # fmt: skip

    def test_beam_sample_generate(self):
        """Stands in for transformers' `test_beam_sample_generate` (plus: reproducible with the seed)."""
        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = model_class(config).eval()
            output_generate = self._beam_sample_generate(model, inputs_dict, beam_kwargs=self._get_beam_kwargs())
            self._assert_length(output_generate, inputs_dict)
            again = self._beam_sample_generate(model, inputs_dict, beam_kwargs=self._get_beam_kwargs())
            self.assertListEqual(output_generate.tolist(), again.tolist())

    def test_beam_sample_generate_dict_output(self):
        """Stands in for transformers' `test_beam_sample_generate_dict_output` (with `num_return_sequences=2`)."""
        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = self._model_with_attentions(model_class, config)
            beam_kwargs = self._get_beam_kwargs(num_return_sequences=2)
            output_generate = self._beam_sample_generate(
                model, inputs_dict, beam_kwargs=beam_kwargs, **self._dict_flags(use_cache=False)
            )
            self._assert_length(output_generate.sequences, inputs_dict)
            self.assertIsInstance(output_generate, GenerateBeamDecoderOnlyOutput)
            self._check_outputs(
                output_generate, model.config, num_return_sequences=beam_kwargs["num_return_sequences"],
                num_beams=beam_kwargs["num_beams"],
            )  # fmt: skip

    # --- assisted and prompt-lookup decoding --------------------------------------------------------------------------

    def _assisted_kwargs(self, do_sample=False):
        return {
            "eos_token_id": -1,  # no early stop
            "max_new_tokens": 4,  # at least two forward passes of the main model
            "num_beams": 1,
            "do_sample": do_sample,
            **self._dict_flags(use_cache=True),
        }

    @parameterized.expand([("random",), ("same",)])
    def test_assisted_decoding_matches_greedy_search(self, assistant_type):
        """Stands in for transformers' `test_assisted_decoding_matches_greedy_search` (batch 1; the assistant is the
        model itself, every candidate accepted, or a random one, none accepted)."""
        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate(batch_size=1)
            model = self._model_with_attentions(model_class, config)
            generation_kwargs = self._assisted_kwargs()
            logits_processor_kwargs = self._get_logits_processor_kwargs(config=model.config)
            with torch.no_grad():
                output_greedy = model.generate(**generation_kwargs, **inputs_dict, **logits_processor_kwargs)
                assistant_model = model
                if assistant_type == "random":
                    assistant_model = self._model_with_attentions(model_class, config)
                assistant_model.generation_config.num_assistant_tokens = 2
                assistant_model.generation_config.num_assistant_tokens_schedule = "constant"
                generation_kwargs["assistant_model"] = assistant_model
                output_assisted = model.generate(**generation_kwargs, **inputs_dict, **logits_processor_kwargs)
            self._check_similar_generate_outputs(output_greedy, output_assisted)
            for output in (output_greedy, output_assisted):
                self._check_outputs(output, model.config, use_cache=True)

    def test_assisted_decoding_sample(self):
        """Stands in for transformers' `test_assisted_decoding_sample` (the outputs' format; sampling does not
        promise the same tokens)."""
        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate(batch_size=1)
            model = self._model_with_attentions(model_class, config)
            model.generation_config.num_assistant_tokens = 2
            model.generation_config.num_assistant_tokens_schedule = "constant"
            with torch.no_grad():
                # The image token banned, as in the greedy assisted test: an assistant restarts from the prompt with
                # its image, and a sampled image token would be one placeholder too many (LLaVA raises on it too).
                output_assisted = model.generate(
                    **self._assisted_kwargs(do_sample=True), assistant_model=model, **inputs_dict,
                    **self._get_logits_processor_kwargs(do_sample=True, config=model.config),
                )  # fmt: skip
            self._check_outputs(output_assisted, config, use_cache=True)

    def test_prompt_lookup_decoding_matches_greedy_search(self):
        """Stands in for transformers' `test_prompt_lookup_decoding_matches_greedy_search`."""
        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate(batch_size=1)
            model = self._model_with_attentions(model_class, config)
            generation_kwargs = self._assisted_kwargs()
            with torch.no_grad():
                output_greedy = model.generate(**generation_kwargs, **inputs_dict)
                output_prompt_lookup = model.generate(**generation_kwargs, prompt_lookup_num_tokens=2, **inputs_dict)
            self._check_similar_generate_outputs(output_greedy, output_prompt_lookup)
            for output in (output_greedy, output_prompt_lookup):
                self._check_outputs(output, model.config, use_cache=True)

    # --- padding, cache format and continuation ----------------------------------------------------------------------

    def test_left_padding_compatibility(self):
        """Stands in for transformers' `test_left_padding_compatibility`: the last token's logits are the same with
        32 positions of left padding (masked) as without. The tester's other inputs (a VLM's image) go in both calls."""
        if not self.has_attentions:
            self.skipTest(reason="This model doesn't support padding.")

        def _prepare_model_kwargs(input_ids, attention_mask, signature):
            model_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if "position_ids" in signature:
                position_ids = torch.cumsum(attention_mask, dim=-1) - 1
                position_ids.masked_fill_(attention_mask == 0, 1)
                model_kwargs["position_ids"] = position_ids
            return model_kwargs

        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            input_ids = inputs_dict["input_ids"]
            attention_mask = inputs_dict.get("attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            others = {k: v for k, v in inputs_dict.items() if k not in ("input_ids", "attention_mask")}
            model = model_class(config).eval()
            signature = inspect.signature(model.forward).parameters.keys()
            model.generation_config.use_cache = False
            with torch.no_grad():
                model_kwargs = _prepare_model_kwargs(input_ids, attention_mask, signature)
                next_logits_wo_padding = model(**model_kwargs, **others).logits[:, -1, :]
                pad_token_id = config.get_text_config().pad_token_id
                pad_token_id = 0 if pad_token_id is None else pad_token_id
                padding = torch.full((input_ids.shape[0], 32), pad_token_id, dtype=input_ids.dtype)
                padded_input_ids = torch.cat((padding, input_ids), dim=1)
                padded_attention_mask = torch.cat((torch.zeros_like(padding), attention_mask), dim=1)
                model_kwargs = _prepare_model_kwargs(padded_input_ids, padded_attention_mask, signature)
                next_logits_with_padding = model(**model_kwargs, **others).logits[:, -1, :]
            torch.testing.assert_close(next_logits_wo_padding, next_logits_with_padding, rtol=1e-5, atol=1e-5)

    def test_past_key_values_format(self):
        """Stands in for transformers' `test_past_key_values_format`: one (key, value) per decoder layer, each
        `(batch, num_key_value_heads, seq_length, head_dim)`."""
        for model_class in self._generative_classes():
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            model = model_class(config).eval()
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            with torch.no_grad():
                outputs = model(**inputs, use_cache=True)
            past_kv = _cache_of(outputs)
            self.assertIsNotNone(past_kv, "the model returns no cache")
            text_config = config.get_text_config()
            num_hidden_layers = text_config.num_hidden_layers
            per_head_embed_dim = getattr(text_config, "head_dim", None) or (
                text_config.hidden_size // text_config.num_attention_heads
            )
            num_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
            self.assertEqual(len(past_kv), num_hidden_layers)
            batch_size, seq_length = inputs["input_ids"].shape
            for i in range(num_hidden_layers):
                keys, values = _layer_kv(past_kv, i)
                self.assertEqual(keys.shape, (batch_size, num_kv_heads, seq_length, per_head_embed_dim))
                self.assertEqual(values.shape, (batch_size, num_kv_heads, seq_length, per_head_embed_dim))

    def test_generate_continue_from_past_key_values(self):
        """Stands in for transformers' `test_generate_continue_from_past_key_values`: 3 tokens, then 1 more from the
        returned cache, equal 4 in one go (tokens and cache). The continuation leaves the image out: its tokens are in
        the cache already, as in a chat's next turn."""
        for model_class in self._generative_classes():
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            inputs = {k: v for k, v in inputs.items() if k not in ("labels", "token_type_ids")}
            model = model_class(config).eval()
            model.generation_config.pad_token_id = model.generation_config.eos_token_id = -1
            model.generation_config.forced_eos_token_id = None
            model.generation_config.use_cache = True
            kwargs = {"do_sample": False, "return_dict_in_generate": True}
            with torch.no_grad():
                outputs = model.generate(**inputs, max_new_tokens=4, **kwargs)
                outputs_cached = model.generate(**inputs, max_new_tokens=3, **kwargs)
                inputs = {k: v for k, v in inputs.items() if k not in IMAGE_INPUTS}
                inputs["cache"] = _cache_of(outputs_cached)
                new_attention_len = outputs_cached.sequences.shape[-1]
                inputs["input_ids"] = outputs_cached.sequences
                if "attention_mask" in inputs:
                    inputs["attention_mask"] = torch.nn.functional.pad(
                        inputs["attention_mask"], (0, new_attention_len - inputs["attention_mask"].shape[1]), value=1
                    )
                outputs_cached = model.generate(**inputs, max_new_tokens=1, **kwargs)
            self.assertListEqual(outputs.sequences.tolist(), outputs_cached.sequences.tolist())
            full, continued = _cache_of(outputs), _cache_of(outputs_cached)
            for layer_idx in range(len(continued)):
                for expected, got in zip(_layer_kv(full, layer_idx), _layer_kv(continued, layer_idx)):
                    self.assertTrue(torch.allclose(expected, got, atol=1e-5), f"layer {layer_idx}")

    # --- inputs_embeds, static cache, logits_to_keep ------------------------------------------------------------------

    @parameterized.expand([("greedy", 1), ("beam search", 2)])
    def test_generate_from_inputs_embeds(self, _, num_beams):
        """Stands in for transformers' `test_generate_from_inputs_embeds`. Unlike transformers' (which drops
        LLaVA's `pixel_values` here), the image stays in: a VLM must find its image positions in `inputs_embeds`
        (issue 15); the random embeddings keep the image token's embedding at those positions."""
        for model_class in self._generative_classes():
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = model_class(config).eval()
            if "inputs_embeds" not in inspect.signature(model.prepare_inputs_for_generation).parameters:
                continue
            input_ids = inputs_dict.pop("input_ids")
            generation_kwargs = {
                "return_dict_in_generate": True, "output_scores": True, "num_beams": num_beams, "do_sample": False,
                "max_new_tokens": 5, "min_new_tokens": 5,
            }  # fmt: skip
            with torch.no_grad():
                outputs_from_ids = model.generate(input_ids, **generation_kwargs, **inputs_dict)
                self.assertEqual(outputs_from_ids.sequences.shape, (input_ids.shape[0], input_ids.shape[1] + 5))
                inputs_embeds = model.get_input_embeddings()(input_ids)
                outputs_from_embeds = model.generate(
                    input_ids, inputs_embeds=inputs_embeds, **generation_kwargs, **inputs_dict
                )
                self._check_similar_generate_outputs(outputs_from_ids, outputs_from_embeds)
                random_embeds = torch.rand_like(inputs_embeds)
                image_token_id = getattr(config, "image_token_id", None)
                if image_token_id is not None:
                    is_image = (input_ids == image_token_id).unsqueeze(-1)
                    random_embeds = torch.where(is_image, inputs_embeds, random_embeds)
                outputs_from_rand_embeds = model.generate(
                    input_ids, inputs_embeds=random_embeds, **generation_kwargs, **inputs_dict
                )
                for i in range(len(outputs_from_rand_embeds.scores)):
                    self.assertFalse(torch.allclose(outputs_from_embeds.scores[i], outputs_from_rand_embeds.scores[i]))
                if "attention_mask" in inputs_dict:
                    outputs_from_embeds_wo_ids = model.generate(
                        inputs_embeds=inputs_embeds, **generation_kwargs, **inputs_dict
                    )
                    outputs_from_embeds.sequences = outputs_from_embeds.sequences[:, inputs_embeds.shape[1] :]
                    self._check_similar_generate_outputs(outputs_from_embeds_wo_ids, outputs_from_embeds)

    def _skip_unless_static_cache(self, model_class):
        # generate's own gate for `cache_implementation="static"` (transformers' test asks `_can_compile_fullgraph`,
        # which says the model also compiles without graph breaks: a stronger claim, tested elsewhere).
        if not model_class._supports_default_dynamic_cache():
            self.skipTest(reason="This model does not support the static cache format")

    def _static_cache_shape(self, config, batch_size, max_cache_len):
        text_config = config.get_text_config()
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        num_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        return text_config.num_hidden_layers, (batch_size, num_kv_heads, max_cache_len, head_dim)

    def test_generate_from_inputs_embeds_with_static_cache(self):
        """Stands in for transformers' `test_generate_from_inputs_embeds_with_static_cache`: the static cache is
        sized for the prompt's embeddings plus the new tokens, less the last (not cached yet)."""
        for model_class in self._generative_classes():
            self._skip_unless_static_cache(model_class)
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = model_class(config).eval()
            input_ids = inputs_dict.pop("input_ids")
            model.generation_config.eos_token_id = model.config.get_text_config().eos_token_id = -1
            max_new_tokens = 10
            inputs_embeds = model.get_input_embeddings()(input_ids)
            with torch.no_grad():
                outputs = model.generate(
                    inputs_embeds=inputs_embeds, max_new_tokens=max_new_tokens, cache_implementation="static",
                    return_dict_in_generate=True, **inputs_dict,
                )  # fmt: skip
            # `max_length - 1`: the last generated token is not in the cache yet.
            num_layers, cache_shape = self._static_cache_shape(
                config, input_ids.shape[0], max_new_tokens + inputs_embeds.shape[1] - 1
            )
            cache = _cache_of(outputs)
            self.assertIsInstance(cache, StaticCache)
            self.assertEqual(len(cache), num_layers)
            self.assertEqual(_layer_kv(cache, 0)[0].shape, cache_shape)

    def test_generate_with_static_cache(self):
        """Stands in for transformers' `test_generate_with_static_cache` (fp32 only: fp16 matmuls on a CPU are
        the device's, not the model's): the cache's shapes, and the same tokens as with the dynamic cache."""
        for model_class in self._generative_classes():
            self._skip_unless_static_cache(model_class)
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = model_class(config).eval()
            batch_size, seq_length = inputs_dict["input_ids"].shape
            max_new_tokens = 20
            generation_kwargs = {
                "max_new_tokens": max_new_tokens, "return_dict_in_generate": True, "output_scores": True,
                "use_cache": True, "do_sample": False,
            }  # fmt: skip
            with torch.no_grad():
                static = model.generate(**generation_kwargs, **inputs_dict, cache_implementation="static")
                dynamic = model.generate(**generation_kwargs, **inputs_dict)
            # cache len = gen len - 1, the last token has no cache (as transformers' test)
            num_layers, cache_shape = self._static_cache_shape(config, batch_size, seq_length + max_new_tokens - 1)
            cache = _cache_of(static)
            self.assertIsInstance(cache, StaticCache)
            self.assertEqual(len(cache), num_layers)
            self.assertEqual(_layer_kv(cache, 0)[0].shape, cache_shape)
            self._check_similar_generate_outputs(dynamic, static)

    def test_generate_methods_with_logits_to_keep(self):
        """Stands in for transformers' `test_generate_methods_with_logits_to_keep`."""
        for model_class in self._generative_classes():
            if "logits_to_keep" not in inspect.signature(model_class.forward).parameters:
                self.skipTest(reason="This model does not support `logits_to_keep` argument.")
            config, inputs_dict = self.prepare_config_and_inputs_for_generate()
            model = model_class(config).eval()
            generation_kwargs = {"max_new_tokens": 10, "do_sample": False}
            with torch.no_grad():
                with_all_logits = model.generate(**generation_kwargs, **inputs_dict, logits_to_keep=0)
                without_all_logits = model.generate(**inputs_dict, **generation_kwargs)
            self.assertEqual(with_all_logits.tolist(), without_all_logits.tolist())

    def test_assisted_decoding_with_logits_to_keep(self):
        """Stands in for transformers' `test_assisted_decoding_with_logits_to_keep`."""
        for model_class in self._generative_classes():
            if "logits_to_keep" not in inspect.signature(model_class.forward).parameters:
                self.skipTest(reason="This model does not support `logits_to_keep` argument.")
            config, inputs_dict = self.prepare_config_and_inputs_for_generate(batch_size=1)
            model = model_class(config).eval()
            generation_kwargs = {
                "max_new_tokens": 10, "do_sample": False, "assistant_model": model, "return_dict_in_generate": True,
                "output_scores": True, **self._get_logits_processor_kwargs(config=model.config),
            }  # fmt: skip
            with torch.no_grad():
                with_all_logits = model.generate(**generation_kwargs, **inputs_dict, logits_to_keep=0)
                without_all_logits = model.generate(**inputs_dict, **generation_kwargs)
            self._check_similar_generate_outputs(with_all_logits, without_all_logits)

    def test_generate_without_input_ids(self):
        """Stands in for transformers' `test_generate_without_input_ids`: generation from the BOS token alone (no
        prompt, no image)."""
        config, _ = self.prepare_config_and_inputs_for_generate()
        text_config = config.get_text_config(decoder=True)
        if text_config.bos_token_id is None:
            self.skipTest(reason="bos_token_id is None")
        if text_config.bos_token_id == text_config.pad_token_id:
            text_config.pad_token_id = None
        for model_class in self._generative_classes():
            model = model_class(config).eval()
            with torch.no_grad():
                output_ids_generate = model.generate(
                    do_sample=False, max_new_tokens=self.max_new_tokens, remove_invalid_values=True
                )
            self.assertIsNotNone(output_ids_generate)

    def test_inherits_generation_mixin(self):
        """Stands in for transformers' `test_inherits_generation_mixin`."""
        for model_class in self._generative_classes():
            self.assertTrue("GenerationMixin" in str(model_class.__mro__), model_class.__name__)

    def test_generate_feeds_a_streamer(self):
        """Stands in for transformers' tests/generation/test_streamers.py (`TextStreamer` on a model): `generate` puts
        the prompt, then each new token, into the streamer, and ends it."""

        class Collect(BaseStreamer):
            def __init__(self):
                self.chunks, self.ended = [], False

            def put(self, value):
                self.chunks.append(value.clone())

            def end(self):
                self.ended = True

        for model_class in self._generative_classes():
            config, inputs = self.prepare_config_and_inputs_for_generate(batch_size=1)
            model = model_class(config).eval()
            streamer = Collect()
            with torch.no_grad():
                out = model.generate(
                    **inputs, streamer=streamer, max_new_tokens=self.max_new_tokens,
                    min_new_tokens=self.max_new_tokens, do_sample=False,
                )  # fmt: skip
            self.assertTrue(streamer.ended)
            self.assertTrue(torch.equal(streamer.chunks[0].reshape(-1), inputs["input_ids"][0]))
            streamed = torch.cat([chunk.reshape(-1) for chunk in streamer.chunks[1:]])
            self.assertTrue(torch.equal(streamed, out[0, inputs["input_ids"].shape[-1] :]), model_class.__name__)

    # --- output checks (as transformers') -----------------------------------------------------------------------------

    def _check_outputs(self, output, config, use_cache=False, num_return_sequences=1, num_beams=1):
        input_batch_size = int(output.sequences.shape[0] / num_return_sequences)
        internal_batch_size = input_batch_size * num_beams if num_beams > 1 else input_batch_size * num_return_sequences
        seq_length = getattr(self.model_tester, "seq_length", None)
        seq_length = getattr(self.model_tester, "encoder_seq_length", seq_length)
        seq_length = getattr(self.model_tester, "text_seq_length", seq_length)
        config = config.get_text_config(decoder=True)
        gen_len = output.sequences.shape[-1] - seq_length
        self._check_scores(internal_batch_size, output.scores, length=gen_len, config=config)
        self._check_logits(internal_batch_size, output.logits, config=config)
        if self.has_attentions:
            attentions = output.attentions if not use_cache else output.attentions[1:]
            min_length = seq_length if not use_cache else seq_length + 1
            self._check_attentions_for_generate(
                internal_batch_size, attentions=attentions, min_length=min_length,
                max_length=output.sequences.shape[-1], config=config, use_cache=use_cache,
            )  # fmt: skip
        hidden_states = output.hidden_states if not use_cache else output.hidden_states[1:]
        min_length = seq_length if not use_cache else seq_length + 1
        self._check_hidden_states_for_generate(
            internal_batch_size, hidden_states, min_length=min_length, max_length=output.sequences.shape[-1],
            config=config, use_cache=use_cache,
        )  # fmt: skip
        if use_cache:
            self._check_past_key_values_for_generate(
                internal_batch_size, _cache_of(output), seq_length=output.sequences.shape[-1] - 1, config=config
            )
        else:
            self.assertIsNone(_cache_of(output))

    def _check_scores(self, batch_size, scores, length, config):
        expected_shape = (batch_size, config.vocab_size)
        self.assertIsInstance(scores, tuple)
        self.assertEqual(len(scores), length)
        self.assertListEqual([iter_scores.shape for iter_scores in scores], [expected_shape] * len(scores))

    def _check_logits(self, batch_size, scores, config):
        self.assertIsInstance(scores, tuple)
        self.assertListEqual([iter_scores.shape[0] for iter_scores in scores], [batch_size] * len(scores))
        vocab_diff = config.vocab_size - scores[0].shape[-1]
        self.assertTrue(vocab_diff in [0, 1])
        self.assertListEqual([config.vocab_size - score.shape[-1] for score in scores], [vocab_diff] * len(scores))

    def _check_attentions_for_generate(self, batch_size, attentions, min_length, max_length, config, use_cache=False):
        self.assertIsInstance(attentions, tuple)
        self.assertListEqual([isinstance(step, tuple) for step in attentions], [True] * len(attentions))
        self.assertEqual(len(attentions), max_length - min_length)
        for idx, iter_attentions in enumerate(attentions):
            tgt_len = min_length + idx if not use_cache else 1
            src_len = min_length + idx
            expected_shape = (batch_size, config.num_attention_heads, tgt_len, src_len)
            self.assertListEqual(
                [layer_attention.shape for layer_attention in iter_attentions], [expected_shape] * len(iter_attentions)
            )

    def _check_hidden_states_for_generate(
        self, batch_size, hidden_states, min_length, max_length, config, use_cache=False
    ):
        self.assertIsInstance(hidden_states, tuple)
        self.assertListEqual([isinstance(step, tuple) for step in hidden_states], [True] * len(hidden_states))
        self.assertEqual(len(hidden_states), max_length - min_length)
        for idx, iter_hidden_states in enumerate(hidden_states):
            seq_len = min_length + idx if not use_cache else 1
            expected_shape = (batch_size, seq_len, config.hidden_size)
            self.assertListEqual(
                [layer_hidden_states.shape for layer_hidden_states in iter_hidden_states],
                [expected_shape] * len(iter_hidden_states),
            )

    def _check_past_key_values_for_generate(self, batch_size, past_key_values, seq_length, config):
        self.assertIsInstance(past_key_values, (tuple, Cache))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        expected_shape = (batch_size, num_kv_heads, seq_length, head_dim)
        for layer_idx in range(len(past_key_values)):
            keys, values = _layer_kv(past_key_values, layer_idx)
            self.assertEqual(keys.shape, expected_shape)
            self.assertEqual(values.shape, expected_shape)
