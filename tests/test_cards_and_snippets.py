"""Every model card's Python blocks and the README's run as written, in a fresh process, against the folder they
describe (a Hub id replaced by the local folder; the user's photos by small images); cards carry license, tags,
base_model and model-index results; a loaded model's `save_pretrained` / `push_to_hub` keep its card."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_reliability_jobs as reliability
import torch
import yaml
from huggingface_hub import ModelCard
from PIL import Image
from test_convert_clip_moe_original import openai_naming
from test_mode_build import write_clusters
from test_moiie_train_command import run as train_moiie
from test_moiie_training import SAMPLES
from test_reliability_jobs import TRAINERS, _mcl, tta
from transformers import AutoProcessor, CLIPModel, CLIPVisionModel

from hf_moe.cli import main as cli_main
from hf_moe.clip_moe.lora import clip_moe_lora_config, merge_lora_into_folder
from hf_moe.conversion import build_mode, convert_clip_moe_original, merge_wemoe, upcycle_clip, upcycle_moiie
from hf_moe.hub import add_eval_results, write_model_card
from hf_moe.merging import merge_clip_vision
from hf_moe.toy import save_toy_clip

from helpers import BLOCK_HF_MOE, save_tiny_bert


# The inputs of the training runs (and the fixtures they come from), as tests/test_reliability_jobs.py makes them.
trainer_inputs, captions, task_dirs = reliability.trainer_inputs, reliability.captions, reliability.task_dirs

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL_ID_LINE = re.compile(r"^model_id = .*$", re.M)
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
PROMPT = "Do you wish to run the custom code"

# Runs jobs [{name, code, cwd, hf_moe}] one after the other, each in its own namespace and working folder (hf_moe
# importable from the first job with `hf_moe` true on, when the script starts with BLOCK_HF_MOE), and writes
# [{name, error}]: an exception, or transformers' interactive "run the custom code? [y/N]" prompt (where a user at a
# terminal would be stuck), is the job's error.
RUNNER = r"""
import builtins, contextlib, io, json, os, sys, time, traceback

jobs = json.load(open(sys.argv[1]))
prompts = []

def no_prompt(prompt=""):
    prompts.append(str(prompt))
    raise EOFError("interactive prompt")

builtins.input = no_prompt
results = []
for job in jobs:
    if job.get("hf_moe"):  # the jobs that use hf_moe come last: from here on it is importable
        sys.meta_path[:] = [finder for finder in sys.meta_path if type(finder).__name__ != "NoHfMoe"]
    os.chdir(job["cwd"])
    prompts.clear()
    error, start = None, time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(job["code"], job["name"], "exec"), {"__name__": "__main__"})
    except BaseException:
        error = traceback.format_exc()[-4000:]
    if prompts:
        error = f"stopped at an interactive prompt: {prompts[0][:300]}" + (f"\n{error}" if error else "")
    results.append({"name": job["name"], "error": error, "seconds": round(time.perf_counter() - start, 1)})
json.dump(results, open(sys.argv[2], "w"))
"""


def run_jobs(jobs: list[dict], workdir: Path, without_hf_moe: bool) -> dict[str, str | None]:
    """Run `jobs` in one fresh interpreter (hf_moe not importable when `without_hf_moe`): {name: error or None}."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "jobs.json").write_text(json.dumps(jobs))
    script = workdir / "runner.py"
    script.write_text((BLOCK_HF_MOE if without_hf_moe else "") + RUNNER)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(workdir / "hf_home"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, str(script), str(workdir / "jobs.json"), str(workdir / "results.json")],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    results = json.loads((workdir / "results.json").read_text())
    assert [r["name"] for r in results] == [job["name"] for job in jobs]
    return {r["name"]: r["error"] for r in results}


def assert_ran(results: dict[str, str | None], prefix: str) -> None:
    ran = {name: error for name, error in results.items() if name.startswith(prefix)}
    assert ran, f"no job named {prefix}..."
    failures = [f"--- {name} ---\n{error}" for name, error in ran.items() if error]
    assert not failures, "\n".join(failures)


def user_images(folder: Path) -> None:
    """The photos a reader has at hand, named as the README names them."""
    Image.new("RGB", (64, 48), "orange").save(folder / "cat.jpg")
    Image.new("RGB", (48, 64), "gray").save(folder / "dog.jpg")


def python_blocks(text: str) -> list[str]:
    return PYTHON_BLOCK.findall(text)


def copy_model(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


@pytest.fixture(scope="module")
def card_folders(toy_clip_dir, upcycled_dir, trainer_inputs, tmp_path_factory) -> dict[str, Path]:
    """One folder per command (and output kind) that writes a model card, each with the card that command wrote:
    the converters called as functions (their commands pass the options through), the training commands run
    through `hf-moe` at the smallest settings their own tests use, and two commands given `--license`."""
    from hf_moe.moiie.toy import save_toy_parts, toy_processor

    root = tmp_path_factory.mktemp("cards")
    licensed = copy_model(toy_clip_dir, root / "licensed-clip")
    write_model_card(licensed, base_model="openai/clip-vit-base-patch32", how_built="A copy.", license="mit")
    finetunes = [save_toy_clip(root / f"finetune{seed}", seed=seed) for seed in (1, 2)]
    for finetune in finetunes:  # licensed as their base, so that what is merged from them all inherits `mit`
        write_model_card(finetune, base_model="openai/clip-vit-base-patch32", how_built="A fine-tune.", license="mit")
    folders = {"upcycle-clip": upcycled_dir}

    upcycle_clip(licensed, root / "upcycle-licensed", num_experts=2, top_k=1)
    folders["upcycle-clip (licensed base)"] = root / "upcycle-licensed"
    argv = ["upcycle-clip", str(licensed), "--output_dir", str(root / "upcycle-apache"), "--num_experts", "2"]
    assert cli_main([*argv, "--top_k", "1", "--license", "apache-2.0"]) == 0
    folders["upcycle-clip (--license)"] = root / "upcycle-apache"

    dense = CLIPModel.from_pretrained(toy_clip_dir)
    torch.save(openai_naming(dense, num_experts=2, moe_layers=1, expert_noise=0.0, long_text=False), root / "r.pt")
    convert_clip_moe_original(root / "r.pt", toy_clip_dir, root / "converted", return_model=False)
    folders["convert-clip-moe-original"] = root / "converted"

    from peft import get_peft_model
    from transformers import AutoModel

    peft_model = get_peft_model(
        AutoModel.from_pretrained(upcycled_dir), clip_moe_lora_config(r=2, alpha=4, routers_trainable=False)
    )
    merge_lora_into_folder(peft_model, upcycled_dir, root / "lora-merged")
    folders["LoRA merge"] = root / "lora-merged"

    merge_clip_vision("task_arithmetic", toy_clip_dir, finetunes, root / "merged", return_model=False)
    folders["merge"] = root / "merged"
    vision = [root / f"vision{k}" for k in range(3)]
    for source, target in zip([toy_clip_dir, *finetunes], vision):
        CLIPVisionModel.from_pretrained(source).save_pretrained(target)
        AutoProcessor.from_pretrained(source).image_processor.save_pretrained(target)
    merge_clip_vision("average", vision[0], vision[1:], root / "merged-vision", return_model=False)
    folders["merge (vision)"] = root / "merged-vision"

    merge_wemoe(licensed, finetunes, root / "wemoe", task_names=["a", "b"], return_model=False)
    folders["merge-wemoe"] = root / "wemoe"
    merge_wemoe(vision[0], vision[1:], root / "wemoe-vision", shared_router=True, return_model=False)
    folders["merge-wemoe (vision)"] = root / "wemoe-vision"

    phi3, siglip = save_toy_parts(root / "moiie-parts", toy_processor())
    upcycle_moiie(phi3, siglip, root / "moiie", return_model=False)
    folders["upcycle-moiie"] = root / "moiie"

    bert = save_tiny_bert(root / "bert")
    clusters = write_clusters(root / "clusters", encoder=bert)
    build_mode(finetunes, clusters, root / "mode", return_model=False)
    folders["mode build"] = root / "mode"

    # The training commands (test_reliability_jobs' runs) from the licensed models, whose license all but adamerging
    # (a merge with unlicensed fine-tunes) inherit; tta-wemoe's --license overrides it.
    context = {**trainer_inputs, "clip": licensed, "upcycled": folders["upcycle-clip (licensed base)"]}
    assert TRAINERS["train-router"](context, root / "router-trained") == 0
    folders["train-router"] = root / "router-trained"
    assert _mcl(context, root / "mcl") == 0
    folders["mcl"] = root / "mcl" / "moe"
    argv = tta(root / "wemoe", context["tasks"], root / "tta", "--max_steps", "3", "--license", "apache-2.0")
    assert cli_main(argv) == 0
    folders["tta-wemoe"] = root / "tta"
    assert TRAINERS["adamerging"](context, root / "adamerged") == 0
    folders["adamerging"] = root / "adamerged"
    assert TRAINERS["mode-train-expert"](context, root / "expert0") == 0
    folders["mode train-expert"] = root / "expert0"
    # Both stages of train-moiie, the second with LoRA (merged into the saved model), each in its own inputs folder;
    # stage 1 on image-caption pairs only, as its data is (a batch without an image gives the projector no gradient).
    pretrain_inputs = shutil.copytree(trainer_inputs["moiie"], root / "moiie-pretrain")
    (pretrain_inputs / "data.json").write_text(json.dumps([sample for sample in SAMPLES if "image" in sample] * 4))
    assert train_moiie(pretrain_inputs, "--stage", "pretrain") == 0
    folders["train-moiie (pretrain)"] = pretrain_inputs / "out"
    finetune = ["--stage", "finetune", "--lora_rank", "2", "--log_expert_load", "none"]
    assert train_moiie(trainer_inputs["moiie"], *finetune) == 0
    folders["train-moiie"] = trainer_inputs["moiie"] / "out"
    return folders


def card_jobs(card_folders: dict[str, Path], cwd: Path) -> list[dict]:
    """Each card's Python blocks with `model_id` pointed at its folder: every folder's own, so that what a command
    saves beside the weights (remote code, processor, config) is what its snippet is run against."""
    jobs = []
    for name, folder in card_folders.items():
        blocks = python_blocks((folder / "README.md").read_text())
        assert blocks, f"the {name} card has no Python block"
        for number, code in enumerate(blocks):
            assert len(MODEL_ID_LINE.findall(code)) == 1, f"the {name} card's block {number} has no single model_id"
            code = MODEL_ID_LINE.sub(f"model_id = {str(folder)!r}", code)
            jobs.append({"name": f"card: {name}, block {number}", "code": code, "cwd": str(cwd)})
    return jobs


@pytest.fixture(scope="module")
def fresh_process(card_folders, toy_clip_dir, tmp_path_factory) -> tuple[dict, Path]:
    """The cards' snippets, the README's blocks and the save/push of loaded models in one fresh interpreter (one
    start-up for all): first without hf_moe, then the README's Python-API blocks, which import it.
    Returns ({job: error or None}, its working folder)."""
    root = tmp_path_factory.mktemp("fresh")
    readme = readme_jobs(card_folders, toy_clip_dir, root / "readme")
    jobs = card_jobs(card_folders, root) + [job for job in readme if "hf_moe" not in job["code"]]
    push_folders = {name: str(card_folders[kind]) for name, kind in PUSHED.items()}
    push = f"folders, work = {push_folders!r}, {str(root)!r}\n" + PUSH_SCRIPT
    jobs.append({"name": "push", "code": push, "cwd": str(root)})  # after the snippets: it patches the Hub client
    jobs += [{**job, "hf_moe": True} for job in readme if "hf_moe" in job["code"]]
    return run_jobs(jobs, root / "run", without_hf_moe=True), root


def test_every_card_snippet_runs_as_written_in_a_fresh_process_without_hf_moe(fresh_process):
    assert_ran(fresh_process[0], "card: ")


def test_each_family_card_shows_its_own_use(card_folders):
    for name in ("upcycle-moiie", "train-moiie (pretrain)", "train-moiie"):
        text = (card_folders[name] / "README.md").read_text()
        code = "\n".join(python_blocks(text))
        assert ".generate(" in code and 'pipeline("image-text-to-text"' in code, name
        assert "zero-shot-image-classification" not in text and "logits_per_image" not in code, name
        assert "hf-moe eval" not in text, name
        assert ModelCard.load(card_folders[name] / "README.md").data.pipeline_tag == "image-text-to-text"
    for name in ("merge-wemoe", "tta-wemoe"):
        assert "output_routing_weights=True" in (card_folders[name] / "README.md").read_text(), name
    for name, folder in card_folders.items():  # remote code is named only where the folder carries it
        remote = any(folder.glob("*.py"))
        assert ("`trust_remote_code=True` runs" in (folder / "README.md").read_text()) == remote, name
    mode_card = (card_folders["mode build"] / "README.md").read_text()
    assert "outputs.task_weights" in mode_card and "hf-moe mode report" in mode_card
    for name, folder in card_folders.items():
        for code in python_blocks((folder / "README.md").read_text()):
            for line in code.splitlines():
                if "AutoProcessor.from_pretrained(" in line:
                    assert "trust_remote_code=True" in line, (name, line)


def test_cards_carry_license_tags_and_base_model(card_folders):
    for name, folder in card_folders.items():
        card = ModelCard.load(folder / "README.md")
        assert {"hf-moe", "mixture-of-experts"} <= set(card.data.tags), name
        assert card.data.library_name == "transformers", name
        assert "## License" in card.text, name
    # A base whose card names a license passes it on (converters and training commands alike); a bare local base has
    # none to pass on, and the card says so.
    for name in ("upcycle-clip (licensed base)", "merge-wemoe", "mcl", "train-router", "mode train-expert"):
        card = ModelCard.load(card_folders[name] / "README.md")
        assert card.data.license == "mit" and card.data.base_model == "openai/clip-vit-base-patch32", name
        assert "`mit`, the license of the base model(s)" in card.text, name
    card = ModelCard.load(card_folders["upcycle-clip"] / "README.md")
    assert card.data.license is None and "Not recorded" in card.text and "their licenses apply" in card.text


def test_license_option_overrides_the_inherited_license(card_folders):
    # `--license apache-2.0` given to a converter and to a training command, both from a base licensed `mit`.
    for name in ("upcycle-clip (--license)", "tta-wemoe"):
        text = (card_folders[name] / "README.md").read_text()
        assert yaml.safe_load(text.split("---")[1])["license"] == "apache-2.0", name
        card = ModelCard(text)
        assert card.data.base_model == "openai/clip-vit-base-patch32", name
        assert "## License\n\n`apache-2.0`." in card.text and "`mit`" not in card.text, name


@pytest.mark.parametrize("value", ["Apache 2.0", "", "MIT"])
def test_a_license_the_hub_would_refuse_is_refused_before_anything_is_written(
    value, toy_clip_dir, upcycled_dir, tmp_path, capsys
):
    converter = ["upcycle-clip", str(toy_clip_dir), "--num_experts", "2", "--output_dir", str(tmp_path / "moe")]
    trainer = ["train-router", "--model", str(upcycled_dir), "--data", str(tmp_path), "--output_dir"]
    for argv in (converter, [*trainer, str(tmp_path / "routed")]):
        assert cli_main([*argv, "--license", value]) == 1
        error = capsys.readouterr().err
        assert f"--license {value!r} is not a license the Hub takes" in error, error
        if value == "MIT":
            assert "did you mean 'mit'?" in error
    assert not (tmp_path / "moe").exists() and not (tmp_path / "routed").exists()
    with pytest.raises(ValueError, match="license 'a b' is not a license the Hub takes"):
        write_model_card(tmp_path, base_model=None, how_built="", license="a b")


def test_eval_results_are_in_the_hubs_model_index(card_folders, tmp_path):
    folder = copy_model(card_folders["upcycle-clip"], tmp_path / "evaluated")
    add_eval_results(folder, {"top1": 0.5, "num_images": 10}, task="zero-shot-image-classification", dataset="digits")
    metadata = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    [entry] = metadata["model-index"]
    [result] = entry["results"]
    assert entry["name"] == "clip-moe" and result["task"]["type"] == "zero-shot-image-classification"
    assert result["dataset"]["name"] == "digits" and result["metrics"] == [
        {"type": "top1", "value": 0.5, "name": "top1"}
    ]


# The cards a loaded model's save_pretrained writes and its push_to_hub uploads (to a new repo, through an offline
# stand-in for the Hub's API), in cards.json.
PUSH_SCRIPT = r"""
import json, os
import huggingface_hub
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoModel, AutoModelForCausalLM, modeling_utils
from transformers.utils import hub

uploaded = {}

class OfflineHub:  # create_repo and create_commit as the Hub answers them for a new repo
    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            if op.path_in_repo == "README.md":
                with open(op.path_or_fileobj) as handle:
                    uploaded[repo_id] = handle.read()

class NewRepoCard(huggingface_hub.ModelCard):  # the new repo has no README yet
    @classmethod
    def load(cls, repo_id_or_path, *args, **kwargs):
        if os.path.isfile(str(repo_id_or_path)):
            return super().load(repo_id_or_path, *args, **kwargs)
        raise EntryNotFoundError(f"{repo_id_or_path} has no README.md")

hub.hf_api = modeling_utils.hf_api = lambda *args, **kwargs: OfflineHub()
hub.ModelCard = NewRepoCard
result = {}
for name, folder in folders.items():
    auto = AutoModelForCausalLM if name == "moiie" else AutoModel
    model = auto.from_pretrained(folder, trust_remote_code=True)
    model.push_to_hub(f"me/{name}", tags=["my-tag"])
    model.save_pretrained(os.path.join(work, name))
    model.save_pretrained(os.path.join(work, name + "-pushed"), push_to_hub=True, repo_id=f"me/{name}-pushed")
    with open(os.path.join(work, name, "README.md")) as handle:
        saved = handle.read()
    result[name] = {
        "push_to_hub": uploaded[f"me/{name}"],
        "save_pretrained": saved,
        "save_pretrained(push_to_hub=True)": uploaded[f"me/{name}-pushed"],
    }
with open(os.path.join(work, "cards.json"), "w") as handle:
    json.dump(result, handle)
"""
PUSHED = {"clip-moe": "upcycle-clip", "wemoe": "merge-wemoe", "moiie": "upcycle-moiie", "mode": "mode build"}


def test_save_pretrained_and_push_to_hub_of_a_loaded_model_keep_its_card(fresh_process, card_folders):
    results, root = fresh_process
    assert_ran(results, "push")
    cards = json.loads((root / "cards.json").read_text())
    for name, kind in PUSHED.items():
        ours = ModelCard.load(card_folders[kind] / "README.md")
        for how, text in cards[name].items():
            assert "automatically generated" not in text, (name, how)
            card = ModelCard(text)
            assert card.text == ours.text, (name, how)
            assert card.data.base_model == ours.data.base_model, (name, how)
            assert set(ours.data.tags) <= set(card.data.tags), (name, how)
        assert "my-tag" in ModelCard(cards[name]["push_to_hub"]).data.tags


# Names the README uses for models a reader has built or downloaded; the test points them at toy folders.
README_MODELS = {
    "clip-moe-l14": "upcycle-clip",
    "wemoe-b32-tta": "tta-wemoe",
    "moiie-stage2": "train-moiie",
    "mode-4-b32": "mode build",
}
# A block that writes a model gets a working folder without it.
README_OUTPUTS = {"upcycle_clip(": "clip-moe-l14", "merge_lora_into_folder(": "clip-moe-l14-lora-merged"}


def readme_jobs(card_folders: dict[str, Path], toy_clip_dir: Path, root: Path) -> list[dict]:
    """The README's Python blocks, each in its own working folder holding what it reads: the models it names
    (links to toy folders), `cat.jpg` / `dog.jpg` and a `captions` folder; the base's Hub id is the toy CLIP."""
    from hf_moe.toy_data import save_digit_caption_folder

    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 6
    captions = save_digit_caption_folder(root / "captions", count=8)
    jobs = []
    for number, code in enumerate(blocks):
        cwd = root / f"block{number}"
        cwd.mkdir(parents=True)
        user_images(cwd)
        written = {name for call, name in README_OUTPUTS.items() if call in code}
        for name, kind in README_MODELS.items():
            if f'"{name}"' in code and name not in written:
                (cwd / name).symlink_to(card_folders[kind])
        if '"captions"' in code:
            (cwd / "captions").symlink_to(captions)
        code = code.replace('"openai/clip-vit-large-patch14"', repr(str(toy_clip_dir)))
        jobs.append({"name": f"README block {number}", "code": code, "cwd": str(cwd)})
    return jobs


def test_readme_python_blocks_run_as_written(fresh_process):
    assert_ran(fresh_process[0], "README block ")
    assert len([name for name in fresh_process[0] if name.startswith("README block ")]) >= 6
