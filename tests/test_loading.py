"""hf_moe.loading: missing local folders fail at once, broken weights files are named, dense vs MoE is checked."""

import shutil
from pathlib import Path

import pytest
import transformers
from transformers import CLIPModel

from hf_moe.loading import check_model_path, load_pretrained, looks_like_local_path
from hf_moe.modeling import CLIPMoEModel


def test_paths_and_hub_ids_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_local_path("runs/clip-moe")
    (tmp_path / "runs").mkdir()
    assert looks_like_local_path("runs/clip-moe")
    for path in ["/abs/model", "./model", "../model", "~/model", "runs/mcl/stage0", Path("model")]:
        assert looks_like_local_path(path), path
    for repo_id in ["openai/clip-vit-large-patch14", "gpt2"]:
        assert not looks_like_local_path(repo_id), repo_id


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model", "~/no-such-hf-moe-model", "runs/mcl/stage0"])
def test_missing_local_folder_fails_without_trying_the_hub(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        transformers.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("must not look up the Hub")
    )
    with pytest.raises(FileNotFoundError, match=f"model folder '{name}' does not exist"):
        load_pretrained(name)


def test_hub_id_that_cannot_be_reached_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match="'hf-moe-tests/no-such-model'"):
        load_pretrained("hf-moe-tests/no-such-model")  # offline in the tests: transformers answers at once


def test_a_file_or_a_folder_without_config_is_not_a_model(toy_clip_dir, tmp_path):
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_model_path(toy_clip_dir / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        check_model_path(tmp_path / "empty")


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda data: data[: len(data) // 2], "is truncated"),
        (lambda data: data[:-1], "is truncated"),
        (lambda data: b"\x05", "is corrupt"),
        (lambda data: data[:8] + b"{not json" + data[17:], "is corrupt"),
    ],
    ids=["half", "one_byte_short", "stub", "garbled_header"],
)
def test_broken_weights_file_is_named(upcycled_dir, tmp_path, damage, match):
    folder = tmp_path / "moe"
    shutil.copytree(upcycled_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(OSError, match=f"Model weights file '{weights}' {match}"):
        load_pretrained(folder)


def test_dense_and_moe_requirements(toy_clip_dir, upcycled_dir):
    with pytest.raises(ValueError, match=r"is a 'clip' model, not a CLIP-MoE .*upcycle it first"):
        load_pretrained(toy_clip_dir, require_moe=True)
    with pytest.raises(ValueError, match=r"is already a CLIP-MoE \('clip_moe'\); this step needs a DENSE CLIP"):
        load_pretrained(upcycled_dir, CLIPModel, require_moe=False)
    assert type(load_pretrained(toy_clip_dir, CLIPModel, require_moe=False)) is CLIPModel


def test_own_models_load_without_remote_code_and_take_config_overrides(upcycled_dir):
    model = load_pretrained(upcycled_dir, require_moe=True, expert_dropout=0.25)
    assert type(model) is CLIPMoEModel  # the in-process class, not a remote-code copy
    assert model.config.text_config.expert_dropout == model.config.vision_config.expert_dropout == 0.25


@pytest.mark.parametrize("model_type", ["we_moe", "we_moe_vision_model", "moiie", "mode"])
def test_every_hf_moe_model_is_refused_where_a_dense_model_is_needed(model_type):
    from types import SimpleNamespace

    from hf_moe.loading import check_model_type, check_moe

    config = SimpleNamespace(model_type=model_type)
    with pytest.raises(
        ValueError, match=rf"'folder' is already a \w[\w-]* \('{model_type}'\); this step needs a DENSE"
    ):
        check_moe(config, "folder", require_moe=False)
    with pytest.raises(ValueError, match=rf"is a \w[\w-]* model \('{model_type}'\), not a CLIP-MoE"):
        check_moe(config, "folder", require_moe=True)
    with pytest.raises(ValueError, match=r"the seed of X takes model_type 'clip'"):
        check_model_type(config, "folder", {"clip"}, "the seed of X")
    check_model_type(config, "folder", {model_type}, "X")


def test_every_model_type_of_hf_moe_modeling_has_a_family():
    """`HF_MOE_MODEL_TYPES` is written by hand: a config added to `hf_moe.modeling` without an entry there would load
    as a dense model where `require_moe=False` must refuse it."""
    import importlib
    import inspect
    import pkgutil

    import hf_moe.modeling
    from hf_moe.loading import CLIP_MOE_MODEL_TYPES, HF_MOE_MODEL_TYPES

    model_types = set()
    for info in pkgutil.iter_modules(hf_moe.modeling.__path__):
        module = importlib.import_module(f"hf_moe.modeling.{info.name}")
        for value in vars(module).values():
            if inspect.isclass(value) and issubclass(value, transformers.PretrainedConfig):
                if value.__module__ == module.__name__ and value.model_type:
                    model_types.add(value.model_type)
    assert model_types == set(HF_MOE_MODEL_TYPES)
    assert CLIP_MOE_MODEL_TYPES == {"clip_moe", "clip_moe_text_model", "clip_moe_vision_model"}
