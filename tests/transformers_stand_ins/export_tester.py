"""hf-moe's stand-in for transformers' tests/exporters/test_export.py (not in the sdist), the base of
`ModelTesterMixin`: `torch.export` of the model on the tester's inputs, whose exported program must compute what the
model computes."""

import torch


class ExportTesterMixin:
    def test_torch_export(self):
        if not getattr(self, "test_torch_exportable", True):
            self.skipTest("the tester marks the model as not exportable")
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            inputs_for_class = self._prepare_for_class(inputs, model_class)
            tensors = {key: value for key, value in inputs_for_class.items() if isinstance(value, torch.Tensor)}
            if getattr(model.config.get_text_config(decoder=True), "use_cache", False):
                tensors["use_cache"] = False  # a returned Cache is no pytree output torch.export can hold
            with torch.no_grad():
                expected = model(**tensors)
                program = torch.export.export(model, args=(), kwargs=tensors, strict=False)
                exported = program.module()(**tensors)
            first = next(value for value in expected.values() if isinstance(value, torch.Tensor))
            got = exported[next(iter(expected.keys()))] if isinstance(exported, dict) else exported[0]
            torch.testing.assert_close(got, first, msg=model_class.__name__)
