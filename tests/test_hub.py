"""Model cards of every written model (content, a usage snippet that runs) and a mocked upload of the real folder."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from test_convert_clip_moe_original import openai_naming
from transformers import CLIPModel

import hf_moe.hub
from hf_moe.cli import main
from hf_moe.conversion import convert_clip_moe_original, upcycle_clip
from hf_moe.hub import add_eval_results, write_model_card


HUB_BASE = "openai/clip-vit-base-patch32"


@pytest.fixture(scope="module")
def base_with_card(toy_clip_dir, tmp_path_factory):
    """The toy CLIP as a local copy of a Hub model: its card names the Hub id it came from."""
    folder = tmp_path_factory.mktemp("hub-base") / "clip"
    shutil.copytree(toy_clip_dir, folder)
    write_model_card(folder, base_model=HUB_BASE, how_built="A test copy.", tags=["clip"])
    return folder


def usage_code(card_path) -> str:
    return re.search(r"```python\n(.*?)```", card_path.read_text(), re.DOTALL).group(1)


def run_usage(card_path, model_dir) -> dict:
    """Execute the card's usage snippet against the local folder (its `model_id = ...` line pointed there)."""
    code, count = re.subn(r"^model_id = .*$", f"model_id = {str(model_dir)!r}", usage_code(card_path), flags=re.M)
    assert count == 1
    namespace = {}
    exec(compile(code, str(card_path), "exec"), namespace)
    return namespace


def test_sparse_upcycling_card(base_with_card, tmp_path):
    output = tmp_path / "clip-moe"
    upcycle_clip(base_with_card, output, num_experts=4, top_k=2, seed=7)
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == HUB_BASE  # the Hub id behind the local base, not a local path
    assert {"hf-moe", "mixture-of-experts", "clip-moe"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert card.data.library_name == "transformers"
    text = card.text
    assert "Sparse upcycling" in text and "4 experts per MoE block, top-2 routing" in text and "seed 7" in text
    assert f"hf-moe upcycle-clip {base_with_card} --num_experts 4 --top_k 2 --seed 7" in text
    assert "model_id = 'clip-moe'" in usage_code(output / "README.md")

    namespace = run_usage(output / "README.md", output)
    probs = namespace["probs"]
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(-1), torch.ones(1))
    assert type(namespace["model"]).__name__ == "CLIPMoEModel"
    assert {result["label"] for result in namespace["classifier"](namespace["image"], candidate_labels=["a", "b"])} == {
        "a",
        "b",
    }


def test_multiplet_card_lists_every_base(toy_clip_dir, base_with_card, tmp_path):
    output = tmp_path / "multiplet"
    upcycle_clip([base_with_card, toy_clip_dir], output, top_k=1, long_text=True)
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == HUB_BASE  # the second base is a bare local folder: nothing to link
    assert "Diversified multiplet upcycling" in card.text
    assert f"0. `{base_with_card}`" in card.text and f"1. `{toy_clip_dir}`" in card.text
    assert "(Long-CLIP stretched)" in card.text and "--long_text" in card.text


def test_converted_release_card(base_with_card, tmp_path):
    dense = CLIPModel.from_pretrained(base_with_card)
    torch.save(openai_naming(dense, num_experts=2, moe_layers=1, expert_noise=0.0, long_text=False), tmp_path / "r.pt")
    convert_clip_moe_original(tmp_path / "r.pt", base_with_card, tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == HUB_BASE and "clip-moe" in card.data.tags
    assert "official CLIP-MoE release file `r.pt`" in card.text and "top-2 routing" in card.text
    assert run_usage(tmp_path / "out" / "README.md", tmp_path / "out")["probs"].shape == (1, 2)


def test_push_uploads_the_real_folder(base_with_card, tmp_path, monkeypatch):
    calls = {}

    def create_repo(repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(*, repo_id, folder_path, **kwargs):
        calls["upload_folder"] = (repo_id, folder_path, sorted(path.name for path in folder_path.iterdir()), kwargs)

    monkeypatch.setattr(hf_moe.hub, "create_repo", create_repo)
    monkeypatch.setattr(hf_moe.hub, "upload_folder", upload_folder)
    output = tmp_path / "out"
    argv = ["upcycle-clip", str(base_with_card), "--num_experts", "2", "--output_dir", str(output), "--push_to_hub"]
    argv += ["--hub_model_id", "me/clip-moe", "--hub_token", "tok", "--hub_private_repo", "true"]
    assert main(argv) == 0

    assert calls["create_repo"] == ("me/clip-moe", {"token": "tok", "private": True, "exist_ok": True})
    repo_id, folder, files, kwargs = calls["upload_folder"]
    assert repo_id == "me/clip-moe" and kwargs["token"] == "tok"
    assert folder.resolve() == output.resolve()  # the renamed folder, not the temporary one
    expected = {"config.json", "model.safetensors", "README.md", "configuration_clip_moe.py", "modeling_clip_moe.py"}
    assert expected | {"moe.py", "tokenizer.json", "processor_config.json"} <= set(files)
    assert "model_id = 'me/clip-moe'" in usage_code(output / "README.md")


def test_bad_hub_model_id_is_refused_before_any_work(toy_clip_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hf_moe.hub, "create_repo", lambda *a, **k: pytest.fail("must not reach the Hub"))
    output = tmp_path / "out"
    argv = ["upcycle-clip", str(toy_clip_dir), "--num_experts", "2", "--output_dir", str(output), "--push_to_hub"]
    assert main([*argv, "--hub_model_id", "a/b/c"]) == 1
    assert "'a/b/c' is not a valid Hub repo id" in capsys.readouterr().err
    assert not output.exists()


def test_eval_results_merge_into_the_card(upcycled_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(upcycled_dir, folder)
    write_model_card(folder, base_model=None, how_built="test")
    metrics = {"top1": 0.5, "top5": 0.75, "num_images": 40}  # counts are not results
    add_eval_results(folder, metrics, task="zero-shot-image-classification", dataset="digits")
    add_eval_results(folder, {"top1": 0.625}, task="zero-shot-image-classification", dataset="digits")
    add_eval_results(folder, {"image_to_text_R@1": 0.25}, task="image-text-retrieval", dataset="coco")
    card = ModelCard.load(folder / "README.md")
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("digits", "top1"): 0.625, ("digits", "top5"): 0.75, ("coco", "image_to_text_R@1"): 0.25}
    assert "| zero-shot-image-classification | digits | top1 | 0.6250 |" in card.text
    assert "0.5000" not in card.text and card.text.count("| task | dataset | metric | value |") == 1
    assert card.data.model_name == "model"

    # Not a local folder with a card (a Hub id, a folder without README.md): nothing happens.
    assert add_eval_results("openai/clip-vit-base-patch32", {"top1": 1.0}, task="t", dataset="d") is None
    (folder / "README.md").unlink()
    assert add_eval_results(folder, {"top1": 1.0}, task="t", dataset="d") is None
    assert not (folder / "README.md").exists()


def test_card_metrics_and_base_model_lists(tmp_path):
    card = write_model_card(
        tmp_path,
        base_model=[HUB_BASE, [HUB_BASE, "org/other"], None],
        how_built="test",
        metrics={"top1": 0.5},
        metrics_task="zero-shot-image-classification",
        metrics_dataset="cifar10",
        usage="print('hi')",
    )
    assert card.data.base_model == [HUB_BASE, "org/other"]
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in card.data.eval_results] == [
        ("cifar10", "top1", 0.5)
    ]
    assert ModelCard.load(tmp_path / "README.md").data.eval_results[0].metric_value == 0.5
    assert "print('hi')" in card.text


def test_card_base_model_names_hub_ids_never_local_folders(tmp_path):
    from hf_moe.hub import write_model_card

    stage = tmp_path / "mcl" / "stage0"
    stage.mkdir(parents=True)
    write_model_card(stage, base_model="openai/clip-vit-base-patch32", how_built="MCL stage 0")
    bare = tmp_path / "bare"
    bare.mkdir()
    out = tmp_path / "out"
    out.mkdir()

    card = write_model_card(out, base_model=[str(stage), str(bare)], how_built="x")
    assert card.data.base_model == "openai/clip-vit-base-patch32"
    card = write_model_card(out, base_model=str(bare), how_built="x")
    assert card.data.base_model is None


def _imported_modules(path) -> set[str]:
    """Every module `path` imports, at module level or inside functions, as `hf_moe.X` for relative imports."""
    import ast

    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "hf_moe." * (node.level == 1) + (node.module or "")
            modules.update([base] + [f"{base}.{alias.name}".replace("..", ".") for alias in node.names])
    return modules


def test_hub_cards_and_publish_never_import_training():
    """The Hub, card and write layer sits below the training commands: training may push through hub, never the
    reverse (they imported each other, function-level imports included)."""
    package = Path(hf_moe.hub.__file__).parent
    for name in ("hub", "cards", "publish"):
        imported = _imported_modules(package / f"{name}.py")
        assert not {module for module in imported if module.startswith("hf_moe.training")}, name


def test_converters_take_hub_options_as_one_argument_and_the_older_keywords_with_a_warning(toy_clip_dir, tmp_path):
    """`hub=HubArguments(...)` carries the Hub and card options. The older keywords one by one still work, with a
    FutureWarning, and reach the card, not the model config (upcycle_clip's **moe_kwargs) nor the merge method
    (merge_clip_vision's **options)."""
    from hf_moe.arguments import HubArguments
    from hf_moe.merging import merge_clip_vision

    upcycle_clip(toy_clip_dir, tmp_path / "new", num_experts=2, return_model=False, hub=HubArguments(license="mit"))
    assert ModelCard.load(tmp_path / "new" / "README.md").data.license == "mit"
    with pytest.warns(FutureWarning, match=r"hub=HubArguments\(license=\.\.\.\)"):
        upcycle_clip(toy_clip_dir, tmp_path / "old", num_experts=2, return_model=False, license="mit")
    assert ModelCard.load(tmp_path / "old" / "README.md").data.license == "mit"
    assert "license" not in json.loads((tmp_path / "old" / "config.json").read_text())
    with pytest.warns(FutureWarning, match=r"hub=HubArguments\(hub_model_id=\.\.\., license=\.\.\.\)"):
        merge_clip_vision(
            "average", toy_clip_dir, [toy_clip_dir], tmp_path / "merged", license="mit", hub_model_id="me/merged"
        )
    card = ModelCard.load(tmp_path / "merged" / "README.md")
    assert card.data.license == "mit" and "me/merged" in card.text
    with pytest.raises(TypeError, match="both in hub= and as keywords"):
        upcycle_clip(toy_clip_dir, tmp_path / "both", num_experts=2, hub=HubArguments(), license="mit")
    assert not (tmp_path / "both").exists()


def test_a_merge_without_a_processor_gets_a_snippet_that_loads_the_model_alone(toy_clip_dir, tmp_path):
    from hf_moe.merging import merge_clip_vision
    from hf_moe.toy import save_toy_clip

    bare = [tmp_path / "pretrained", tmp_path / "finetuned"]
    for source, folder in zip([toy_clip_dir, save_toy_clip(tmp_path / "toy1", seed=1)], bare):
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(Path(source) / name, folder / name)
    merge_clip_vision("average", bare[0], bare[1:], tmp_path / "merged", return_model=False)

    code = usage_code(tmp_path / "merged" / "README.md")
    assert "AutoProcessor" not in code and "has no processor" in code
    run_usage(tmp_path / "merged" / "README.md", tmp_path / "merged")
