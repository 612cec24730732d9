"""hf-moe's stand-in for transformers' tests/generation/test_utils.py (not in the sdist): `ModelTesterMixin` only
needs the class to exist (it checks which testers inherit it). A tester that inherits it gets these generation checks
of its own: greedy decoding with the KV cache equals greedy decoding without it, and `generate` feeds a streamer every
new token."""

import torch


class GenerationTesterMixin:
    max_new_tokens = 4

    def _generation_inputs(self, model_class):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        inputs = self._prepare_for_class(inputs, model_class)
        inputs = {key: value for key, value in inputs.items() if key != "labels"}
        return config, inputs

    def test_greedy_generate_with_and_without_cache(self):
        for model_class in getattr(self, "all_generative_model_classes", ()) or self.all_model_classes:
            if not hasattr(model_class, "generate") or not model_class.can_generate():
                continue
            config, inputs = self._generation_inputs(model_class)
            model = model_class(config).eval()
            kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": False, "min_new_tokens": self.max_new_tokens}
            with torch.no_grad():
                cached = model.generate(**inputs, use_cache=True, **kwargs)
                uncached = model.generate(**inputs, use_cache=False, **kwargs)
            self.assertEqual(cached.shape[-1], inputs["input_ids"].shape[-1] + self.max_new_tokens)
            self.assertTrue(torch.equal(cached, uncached), model_class.__name__)

    def test_generate_feeds_a_streamer(self):
        from transformers.generation.streamers import BaseStreamer

        class Collect(BaseStreamer):
            def __init__(self):
                self.chunks, self.ended = [], False

            def put(self, value):
                self.chunks.append(value.clone())

            def end(self):
                self.ended = True

        for model_class in getattr(self, "all_generative_model_classes", ()) or self.all_model_classes:
            if not hasattr(model_class, "generate") or not model_class.can_generate():
                continue
            config, inputs = self._generation_inputs(model_class)
            inputs = {key: value[:1] for key, value in inputs.items() if isinstance(value, torch.Tensor)}
            model = model_class(config).eval()
            streamer = Collect()
            with torch.no_grad():
                out = model.generate(
                    **inputs, streamer=streamer, max_new_tokens=self.max_new_tokens, min_new_tokens=self.max_new_tokens,
                    do_sample=False,
                )  # fmt: skip
            self.assertTrue(streamer.ended)
            streamed = torch.cat([chunk.reshape(-1) for chunk in streamer.chunks[1:]])  # the first is the prompt
            self.assertTrue(torch.equal(streamed, out[0, inputs["input_ids"].shape[-1] :]), model_class.__name__)
