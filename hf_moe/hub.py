"""Model cards and Hub uploads for every folder hf-moe writes.

Every command that writes a model calls `write_model_card` on its (temporary) output folder, so the folder is
ready for the Hub as it is: `push_to_hub` uploads exactly that folder. Evaluation results are merged into an
existing card by `add_eval_results`, both as card-data `eval_results` (which the Hub renders as a results
widget) and as a table in the card's body.
"""

import re
import shlex
from collections.abc import Iterable
from pathlib import Path

import huggingface_hub.errors
from huggingface_hub import EvalResult, ModelCard, ModelCardData, create_repo, upload_folder
from transformers.utils import logging

from .arguments import check_license
from .fileio import atomic_output_dir, atomic_output_file


logger = logging.get_logger(__name__)

ALWAYS_TAGS = ("hf-moe", "mixture-of-experts")
# The metrics table in the card body lives between these markers, so it can be regenerated when results merge.
METRICS_BEGIN = "<!-- hf-moe metrics begin -->"
METRICS_END = "<!-- hf-moe metrics end -->"
# Temporary folders of `hf_moe.fileio.atomic_output_dir` are named `.NAME.tmp-...`: the card must name NAME.
_TEMP_FOLDER = re.compile(r"^\.(?P<name>.+?)\.tmp-")

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ description }}

## How it was built

{{ how_built }}

## Usage

{{ usage_intro }}

```python
{{ usage }}
```

## Evaluation

{{ metrics_table }}

## License

{{ license_text }}
"""

DEFAULT_DESCRIPTION = (
    "A mixture-of-experts model built from dense checkpoints with "
    "[hf-moe](https://github.com/hf-moe/hf-moe): a `transformers` model whose MoE blocks use the packed-experts "
    'layout, so `experts_implementation="eager" | "batched_mm" | "grouped_mm"` works as for Mixtral.'
)


def clip_usage_head(model_id: str) -> list[str]:
    """The opening lines of every CLIP-like card snippet (imports, the model, its processor, an image); each family's
    snippet goes on from `model`, `processor` and `image`."""
    return [
        "import torch",
        "from PIL import Image",
        "from transformers import AutoModel, AutoProcessor, pipeline",
        "",
        f"model_id = {model_id!r}",
        "model = AutoModel.from_pretrained(model_id, trust_remote_code=True).eval()",
        "processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)",
        'image = Image.new("RGB", (224, 224), "white")  # your image: Image.open("photo.jpg")',
    ]


def default_usage(model_id: str, pipeline_tag: str | None = "zero-shot-image-classification") -> str:
    """A runnable snippet: the `model_id = ...` line is the only one a reader (or a test) needs to change.

    `trust_remote_code=True` on the processor too: `AutoProcessor` reads the model's config, whose `auto_map` names
    remote code, and would otherwise stop at transformers' interactive "run the custom code? [y/N]" prompt."""
    if pipeline_tag == "image-text-to-text":
        return image_text_to_text_usage(model_id)
    lines = [
        *clip_usage_head(model_id),
        'labels = ["a photo of a cat", "a photo of a dog"]',
        'inputs = processor(text=labels, images=image, return_tensors="pt", padding=True)',
        "with torch.no_grad():",
        "    probs = model(**inputs).logits_per_image.softmax(dim=-1)",
        "print(dict(zip(labels, probs[0].tolist())))",
    ]
    if pipeline_tag == "zero-shot-image-classification":
        lines += [
            "",
            'classifier = pipeline("zero-shot-image-classification", model=model_id, trust_remote_code=True)',
            "print(classifier(image, candidate_labels=labels))",
        ]
    return "\n".join(lines)


def image_text_to_text_usage(model_id: str) -> str:
    """`generate` from a chat prompt, then the image-text-to-text pipeline: the use of a vision-language model."""
    return "\n".join(
        [
            "import torch",
            "from PIL import Image",
            "from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline",
            "",
            f"model_id = {model_id!r}",
            "model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True).eval()",
            "processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)",
            'image = Image.new("RGB", (384, 384), "white")  # your image: Image.open("photo.jpg")',
            'question = {"type": "text", "text": "What is in the image?"}',
            'messages = [{"role": "user", "content": [{"type": "image"}, question]}]',
            "prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
            'inputs = processor(images=[image], text=prompt, return_tensors="pt")',
            "with torch.no_grad():",
            "    output_ids = model.generate(**inputs, max_new_tokens=20, do_sample=False)",
            'answer = processor.decode(output_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)',
            "print(answer)",
            "",
            'pipe = pipeline("image-text-to-text", model=model_id, trust_remote_code=True)',
            'chat = [{"role": "user", "content": [{"type": "image", "image": image}, question]}]',
            'print(pipe(text=chat, max_new_tokens=20, do_sample=False)[0]["generated_text"][-1]["content"])',
        ]
    )


def model_name_for(folder: str | Path) -> str:
    """The name a card should show for `folder`: the target's name when `folder` is an atomic temp folder."""
    name = Path(folder).resolve().name
    match = _TEMP_FOLDER.match(name)
    return match["name"] if match else name


def _flat_base_models(base_model) -> str | list[str] | None:
    """One Hub id, a de-duplicated list, or None (the Hub rejects paths, empty and duplicate `base_model`
    entries): a local folder stands for the Hub id(s) its own card names, or for nothing."""

    def leaves(item):
        if isinstance(item, (list, tuple)):
            for sub in item:
                yield from leaves(sub)
        elif item:
            hub_ids = base_model_of(item)
            yield from ([hub_ids] if isinstance(hub_ids, str) else hub_ids or [])

    flat = list(dict.fromkeys(leaves(base_model)))
    return None if not flat else flat[0] if len(flat) == 1 else flat


def base_model_of(name_or_path: str | Path) -> str | list[str] | None:
    """The Hub id(s) a model comes from, for a card's `base_model`: a Hub id itself; for a local folder, the
    `base_model` of its own card (an MCL stage or upcycled folder records the Hub model it came from), else
    None (a local path means nothing on the Hub, which rejects it)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        card_path = path / "README.md"
        if not card_path.is_file():
            return None
        try:
            return ModelCard.load(card_path).data.base_model
        except Exception as err:  # a hand-written README without metadata is no reason to fail a conversion
            logger.info(f"Could not read the model card of '{name_or_path}' ({err}).")
            return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        return None
    return str(name_or_path)


EVAL_HINT = "Not evaluated yet (`hf-moe eval zero-shot|retrieval --model FOLDER` adds results here)."


def license_of(name_or_path: str | Path) -> str | None:
    """The `license` of a base model's card: a local folder's own card, or a Hub repo's card (from the local cache,
    or from the Hub unless offline). None where no card states one."""
    path = Path(name_or_path).expanduser()
    card_path = path / "README.md" if path.is_dir() else None
    if card_path is None:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(str(name_or_path))
        except HFValidationError:
            return None
        cached = try_to_load_from_cache(str(name_or_path), "README.md")
        card_path = Path(cached) if isinstance(cached, str) else None
    try:
        if card_path is not None:
            return ModelCard.load(card_path).data.license if card_path.is_file() else None
        import huggingface_hub.constants

        if huggingface_hub.constants.HF_HUB_OFFLINE:
            return None
        return ModelCard.load(str(name_or_path)).data.license
    except Exception as err:  # no card, no network, a card without metadata: the license is just not known
        logger.info(f"Could not read the license of '{name_or_path}' ({err}).")
        return None


def _base_leaves(base_model) -> list[str]:
    if isinstance(base_model, (list, tuple)):
        return [leaf for item in base_model for leaf in _base_leaves(item)]
    return [str(base_model)] if base_model else []


def _license_text(license: str | None, inherited: bool, bases: list[str]) -> str:
    names = ", ".join(f"`{base}`" for base in bases)
    if license and inherited:
        return f"`{license}`, the license of the base model(s) {names} this model derives from."
    if license:
        return f"`{license}`."
    if not bases:
        return "Not recorded: set `license:` in this card's metadata before sharing the model."
    return (
        f"Not recorded: no license was found in the card(s) of the base model(s) {names}, or they differ. This model "
        "derives from their weights, so their licenses apply; set `license:` in this card's metadata before sharing it."
    )


def _metrics_table(
    eval_results: Iterable[EvalResult], untyped: dict | None = None, not_evaluated: str = EVAL_HINT
) -> str:
    rows = [
        f"| {result.task_type} | {result.dataset_name} | {result.metric_name or result.metric_type} | "
        f"{_format(result.metric_value)} |"
        for result in eval_results
    ]
    rows += [f"| | | {name} | {_format(value)} |" for name, value in (untyped or {}).items()]
    if not rows:
        body = not_evaluated
    else:
        body = "\n".join(["| task | dataset | metric | value |", "| --- | --- | --- | --- |", *rows])
    return f"{METRICS_BEGIN}\n{body}\n{METRICS_END}"


def _format(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _eval_results(metrics: dict, task: str, dataset: str) -> list[EvalResult]:
    return [
        EvalResult(
            task_type=task,
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=name,
            metric_name=name,
            metric_value=float(value) if isinstance(value, (int, float)) else value,
        )
        for name, value in metrics.items()
    ]


def write_model_card(
    folder: str | Path,
    *,
    base_model: str | list[str] | None,
    how_built: str,
    tags: Iterable[str] = (),
    pipeline_tag: str | None = "zero-shot-image-classification",
    usage: str | None = None,
    metrics: dict | None = None,
    model_name: str | None = None,
    metrics_task: str | None = None,
    metrics_dataset: str | None = None,
    description: str | None = None,
    license: str | None = None,
    not_evaluated: str | None = None,
) -> ModelCard:
    """Write `folder/README.md`: a `huggingface_hub.ModelCard` for the model saved in `folder`.

    Args:
        folder: The model folder (may be the temporary folder of `atomic_output_dir`; the card then names the
            target folder).
        base_model: Hub id(s) or folder(s) of the checkpoint(s) the model was built from (card data
            `base_model`, which links the Hub's model tree). A folder stands for the Hub id(s) its own card
            names, or for nothing.
        how_built: Free text (markdown): the command line and options, what each expert came from.
        tags: Extra tags; "hf-moe" and "mixture-of-experts" are always present.
        pipeline_tag: The Hub task widget.
        usage: Python code for the usage section; by default loading with `AutoModel` / `pipeline` and
            `trust_remote_code=True` from `model_name`.
        metrics: `{metric: value}` shown in the evaluation table (and, when `metrics_task` and
            `metrics_dataset` are given, also recorded as card-data `eval_results`).
        model_name: The repo id or folder the usage snippet loads; default the folder's name.
        description: What the model is (one paragraph); default a generic hf-moe description.
        license: The card's `license` (a Hub license id, as the commands' `--license`; a malformed one raises a
            ValueError); by default the base models' own, when their cards (local, cached or on the Hub) all state
            the same one; else none, and the card says the base models' licenses apply.
        not_evaluated: The evaluation section before any result; by default it points to `hf-moe eval` for a
            zero-shot-image-classification model and says "Not evaluated yet." for others.

    Returns:
        The card (also saved as `folder/README.md`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot write a model card: model folder '{folder}' does not exist.")
    model_name = model_name or model_name_for(folder)
    tags = list(dict.fromkeys([*ALWAYS_TAGS, *tags]))
    bases = _base_leaves(base_model)
    inherited = check_license(license, "license") is None
    if inherited:
        licenses = {license_of(base) for base in bases}
        license = licenses.pop() if len(licenses) == 1 else None
    base_model = _flat_base_models(base_model)
    if not_evaluated is None:
        not_evaluated = EVAL_HINT if pipeline_tag == "zero-shot-image-classification" else "Not evaluated yet."
    eval_results, untyped = None, metrics
    if metrics and metrics_task and metrics_dataset:
        eval_results, untyped = _eval_results(metrics, metrics_task, metrics_dataset), None
    card_data = ModelCardData(
        base_model=base_model,
        license=license,
        tags=tags,
        pipeline_tag=pipeline_tag,
        library_name="transformers",
        model_name=model_name,
        eval_results=eval_results,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=model_name,
        description=description or DEFAULT_DESCRIPTION,
        how_built=how_built.strip(),
        usage=(usage if usage is not None else default_usage(model_name, pipeline_tag)).strip(),
        usage_intro=(
            "The model code travels with the weights, so no hf-moe install is needed; `trust_remote_code=True` runs "
            "the `*.py` files of this repository."
            if any(folder.glob("*.py"))
            else "An ordinary transformers model: neither remote code nor an hf-moe install is needed."
        ),
        metrics_table=_metrics_table(eval_results or [], untyped, not_evaluated),
        license_text=_license_text(license, inherited, bases),
    )
    card.save(folder / "README.md")
    return card


def add_eval_results(folder: str | Path, metrics: dict, *, task: str, dataset: str) -> ModelCard | None:
    """Merge `metrics` (`{metric: value}`) measured on `dataset` for `task` into the card of the local model
    folder `folder`: card-data `eval_results` (replacing earlier values of the same task/dataset/metric) and
    the evaluation table in the body. Only float scores are recorded (counts such as `num_images` are not
    results). A no-op (logged) when `folder` is not a local folder with a card."""
    card_path = Path(folder) / "README.md"
    if not card_path.is_file():
        logger.info(f"'{folder}' is not a local model folder with a model card; the results are not recorded there.")
        return None
    metrics = {name: value for name, value in metrics.items() if isinstance(value, float)}
    if not metrics:
        return None
    card = ModelCard.load(card_path)
    new = _eval_results(metrics, task, dataset)
    replaced = {(r.task_type, r.dataset_name, r.metric_type) for r in new}
    kept = [r for r in card.data.eval_results or [] if (r.task_type, r.dataset_name, r.metric_type) not in replaced]
    card.data.eval_results = kept + new
    if not card.data.model_name:  # the Hub requires a model name beside eval_results
        card.data.model_name = model_name_for(folder)
    table = _metrics_table(card.data.eval_results)
    text = card.text
    if METRICS_BEGIN in text and METRICS_END in text:
        before, rest = text.split(METRICS_BEGIN, 1)
        after = rest.split(METRICS_END, 1)[1]
        text = before + table + after
    else:  # a card written by someone else: append the section
        text = text.rstrip() + "\n\n## Evaluation\n\n" + table + "\n"
    card.text = text
    with atomic_output_file(card_path) as tmp:
        card.save(tmp)
    logger.info(f"Recorded {', '.join(metrics)} on {dataset} in {card_path}")
    return card


# The HTTP client's base error (httpx's or httpx2's, whichever huggingface_hub uses): its connection errors are not
# OSErrors.
_HTTP_ERROR = getattr(huggingface_hub.errors, "HTTPError", OSError)


class HubUploadError(OSError):
    """An upload that failed after the model folder was written: one line saying why, where the complete folder is,
    and the command that pushes it later."""

    def __init__(self, folder, repo_id: str, cause: BaseException, *, private=None, ignore_patterns=None):
        self.folder, self.repo_id = Path(folder), repo_id
        reason = " ".join(str(cause).split()) or type(cause).__name__
        if len(reason) > 300:  # an HTTP error's body can be long; its first words say what went wrong
            reason = reason[:297] + "..."
        command = ["hf", "upload", repo_id, str(self.folder)]
        if private:
            command.append("--private")
        for pattern in ignore_patterns or ():
            command += ["--exclude", pattern]
        super().__init__(
            f"Upload to the Hub repo '{repo_id}' failed ({type(cause).__name__}: {reason}). The model is saved, "
            f"complete, in '{self.folder}'; push it later with `{shlex.join(command)}`."
        )


def push_to_hub(
    folder: str | Path,
    hub_model_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    ignore_patterns: list[str] | None = None,
) -> str:
    """Create `hub_model_id` if needed and upload the model folder `folder` to it (but files matching
    `ignore_patterns`, e.g. a training run's `checkpoint-*`); returns the repo URL. A failed upload (no network,
    an HTTP error, no token) raises `HubUploadError`: one line naming the repo, the reason, the saved folder and the
    `hf upload` command that pushes it later."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot push: model folder '{folder}' does not exist.")
    if not hub_model_id:
        raise ValueError("push_to_hub needs a hub_model_id (--hub_model_id NAMESPACE/NAME).")
    try:
        repo_url = create_repo(hub_model_id, token=token, private=private, exist_ok=True)
        upload_folder(
            repo_id=repo_url.repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload {model_name_for(folder)} with hf-moe",
            token=token,
            ignore_patterns=ignore_patterns,
        )
    except (OSError, _HTTP_ERROR) as err:  # no network, an HTTP error (auth, quota), offline mode, no token
        raise HubUploadError(folder, hub_model_id, err, private=private, ignore_patterns=ignore_patterns) from err
    logger.info(f"Pushed {folder} to {repo_url}")
    return str(repo_url)


# `save_model_folder`'s `push_to_hub` flag (TrainingArguments' name) shadows the function there.
_upload = push_to_hub


def push_training_output(folder: str | Path, training_args) -> str | None:
    """The training commands' `--push_to_hub` (TrainingArguments' flags): upload the final model in `folder` to
    `--hub_model_id` (default: the output folder's name) from the main process only, leaving out what the run keeps
    beside the model (its checkpoints, job record and logs). Returns the repo URL, or None when not pushing."""
    from accelerate import PartialState

    from .training import JOB_FILE

    if not training_args.push_to_hub or not PartialState().is_main_process:
        return None
    return push_to_hub(
        folder,
        training_args.hub_model_id or Path(training_args.output_dir).name,
        token=training_args.hub_token,
        private=training_args.hub_private_repo,
        ignore_patterns=["checkpoint-*", JOB_FILE, "runs/*"],
    )


def check_hub_model_id(output_dir: str | Path, push_to_hub: bool, hub_model_id: str | None) -> str | None:
    """The repo a folder is pushed to (default: the output folder's name), validated before any work."""
    if not push_to_hub:
        return hub_model_id
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    hub_model_id = hub_model_id or Path(output_dir).name
    try:
        validate_repo_id(hub_model_id)
    except HFValidationError as err:
        raise ValueError(f"--hub_model_id '{hub_model_id}' is not a valid Hub repo id: {err}") from err
    return hub_model_id


def save_model_folder(
    model,
    processor,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    card: dict | None = None,
    inputs: Iterable = (),
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_token: str | None = None,
    hub_private_repo: bool | None = None,
) -> None:
    """`model.save_pretrained`, the processor and a model card (`write_model_card` keywords) written atomically to
    `output_dir`; then the folder is uploaded to `hub_model_id` if `push_to_hub`. `model` may be a
    `hf_moe.checkpoint_io.StreamedModel` (a meta-device model whose weights are written tensor by tensor)."""
    with atomic_output_dir(output_dir, overwrite, inputs=inputs) as tmp:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        if card is not None:
            write_model_card(tmp, **card)
    if push_to_hub:
        _upload(output_dir, hub_model_id, token=hub_token, private=hub_private_repo)
