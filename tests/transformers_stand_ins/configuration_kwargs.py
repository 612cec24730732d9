"""hf-moe's stand-in for transformers' tests/utils/test_configuration_utils.py (not in the sdist): the common
`PreTrainedConfig` arguments with non-default values, which `ConfigTester.check_config_arguments_init` checks a
config stores as given."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "problem_type": "regression",
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
}
