"""Model cards: the one builder every command that writes a model uses, and what cards share.

A command describes its model in a `CardSpec` (what the model is, how it was built, how to use it, its metrics,
the base models it comes from) and `write_card` renders every family's card from that description with one
template, as mergekit's `card.py` builds every merge's card from the merge's own configuration. The parts families
differ in are data: a `Usage` (the lines of the snippet after the model, its processor and an image are loaded) and
the "how it was built" text, whose command line `command_line` writes and whose option table `options_table`
writes. Evaluation results are merged into an existing card by `add_eval_results`, both as card-data
`eval_results` (which the Hub renders as a results widget) and as a table in the card's body.

    card = CardSpec(base_model=bases, how_built="...", tags=("clip-moe",), usage=Usage(body=(...)))
    write_card(folder, card)  # or hf_moe.publish.write_model(model, output_dir, card=card, ...)
"""

import dataclasses
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.utils import logging

from .arguments import check_license
from .fileio import atomic_output_file


logger = logging.get_logger(__name__)

ZERO_SHOT = "zero-shot-image-classification"
IMAGE_TEXT_TO_TEXT = "image-text-to-text"
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


@dataclass(frozen=True)
class Usage:
    """A card's Python snippet, as data: the lines that use `model` (and `processor`, `image`) once the snippet's
    common head has loaded them. `code(model_id)` writes the whole snippet; its `model_id = ...` line is the only one
    a reader (or a test) needs to change.

    `trust_remote_code=True` goes on the processor too where it is an `AutoProcessor`: it reads the model's config,
    whose `auto_map` names remote code, and would otherwise stop at transformers' interactive "run the custom code?
    [y/N]" prompt."""

    body: tuple[str, ...] = ()
    model_class: str = "AutoModel"
    # None: the folder has no processor, so the snippet loads the model alone (no image, no torch).
    processor_class: str | None = "AutoProcessor"
    model_remote_code: bool = True
    processor_remote_code: bool = True
    image_size: int = 224
    # Whether the snippet imports `pipeline`.
    pipeline: bool = True

    def code(self, model_id: str) -> str:
        remote = ", trust_remote_code=True"
        load_model = f"model = {self.model_class}.from_pretrained(model_id{remote if self.model_remote_code else ''})"
        if self.processor_class is None:
            head = [
                f"from transformers import {self.model_class}",
                "",
                f"model_id = {model_id!r}",
                f"{load_model}.eval()",
            ]
            return "\n".join([*head, *self.body])
        names = sorted({self.model_class, self.processor_class}) + (["pipeline"] if self.pipeline else [])
        processor_remote = remote if self.processor_remote_code else ""
        head = [
            "import torch",
            "from PIL import Image",
            f"from transformers import {', '.join(names)}",
            "",
            f"model_id = {model_id!r}",
            f"{load_model}.eval()",
            f"processor = {self.processor_class}.from_pretrained(model_id{processor_remote})",
            f'image = Image.new("RGB", ({self.image_size}, {self.image_size}), "white")  '
            '# your image: Image.open("photo.jpg")',
        ]
        return "\n".join([*head, *self.body])


# The snippet's lines that classify `image` between two labels with a CLIP-like model.
CLASSIFY = (
    'labels = ["a photo of a cat", "a photo of a dog"]',
    'inputs = processor(text=labels, images=image, return_tensors="pt", padding=True)',
    "with torch.no_grad():",
    "    probs = model(**inputs).logits_per_image.softmax(dim=-1)",
    "print(dict(zip(labels, probs[0].tolist())))",
)
ZERO_SHOT_PIPELINE = (
    "",
    'classifier = pipeline("zero-shot-image-classification", model=model_id, trust_remote_code=True)',
    "print(classifier(image, candidate_labels=labels))",
)
# A CLIP-like model: its logits, then the zero-shot pipeline.
ZERO_SHOT_USAGE = Usage(body=CLASSIFY + ZERO_SHOT_PIPELINE)
# A vision-language model: `generate` from a chat prompt, then the image-text-to-text pipeline.
IMAGE_TEXT_TO_TEXT_USAGE = Usage(
    model_class="AutoModelForImageTextToText",
    image_size=384,
    body=(
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
    ),
)
# A folder saved without a processor: neither AutoProcessor nor pipeline() can work from it.
MODEL_ONLY_USAGE = Usage(
    processor_class=None,
    body=("# This folder has no processor: tokenize and preprocess with the base model's processor.",),
)


def default_usage_for(pipeline_tag: str | None) -> Usage:
    """The snippet of a card that names none: by the card's Hub task."""
    if pipeline_tag == IMAGE_TEXT_TO_TEXT:
        return IMAGE_TEXT_TO_TEXT_USAGE
    return ZERO_SHOT_USAGE if pipeline_tag == ZERO_SHOT else Usage(body=CLASSIFY)


def command_line(command: str, positional: Sequence = (), options: dict | None = None, **more) -> str:
    """The `hf-moe` command line that rebuilds a model, for its card: `hf-moe COMMAND POSITIONAL... --key value`
    (`True` as a bare flag; `None` and `False` left out)."""
    parts = ["hf-moe", command, *map(str, positional)]
    for key, value in {**(options or {}), **more}.items():
        if value is None or value is False:
            continue
        parts += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return " ".join(parts)


def options_table(options: dict) -> str:
    """A markdown table of a run's options (`hf_moe.training.result_options`), sorted by name: "how it was built"."""
    rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in sorted(options.items()))
    return f"| option | value |\n| --- | --- |\n{rows}"


@dataclass
class CardSpec:
    """What one model's card says: the per-family description `write_card` renders into every card.

    Args:
        how_built: Markdown: the method, what each expert came from, the command line and options.
        base_model: Hub id(s) or folder(s) of the checkpoint(s) the model was built from (card data `base_model`,
            which links the Hub's model tree). A folder stands for the Hub id(s) its own card names, or for nothing.
        description: What the model is (one paragraph); default a generic hf-moe description.
        usage: The snippet: a `Usage` (written for `model_name`) or literal Python code; default by `pipeline_tag`.
        tags: Extra tags; "hf-moe" and "mixture-of-experts" are always present.
        pipeline_tag: The Hub task widget.
        metrics: `{metric: value}` shown in the evaluation table (and, when `metrics_task` and `metrics_dataset` are
            given, also recorded as card-data `eval_results`).
        not_evaluated: The evaluation section before any result; by default it points to `hf-moe eval` for a
            zero-shot-image-classification model and says "Not evaluated yet." for others.
        model_name: The repo id or folder the usage snippet loads; default the folder's name (the write step gives
            the Hub repo pushed to).
        license: The card's `license` (a Hub license id, as the commands' `--license`; a malformed one raises a
            ValueError); by default the base models' own, when their cards (local, cached or on the Hub) all state
            the same one; else none, and the card says the base models' licenses apply.
    """

    how_built: str
    base_model: str | Path | Sequence | None = None
    description: str | None = None
    usage: Usage | str | None = None
    tags: Sequence[str] = field(default_factory=tuple)
    pipeline_tag: str | None = ZERO_SHOT
    metrics: dict | None = None
    metrics_task: str | None = None
    metrics_dataset: str | None = None
    not_evaluated: str | None = None
    model_name: str | None = None
    license: str | None = None

    def replace(self, **changes) -> "CardSpec":
        return dataclasses.replace(self, **changes)


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
        f"| {result.task_type} | {_dataset_cell(result)} | {result.metric_name or result.metric_type} | "
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


def _eval_results(
    metrics: dict,
    task: str,
    dataset: str,
    dataset_id: str | None = None,
    dataset_config: str | None = None,
    dataset_split: str | None = None,
    metric_names: dict | None = None,
) -> list[EvalResult]:
    # model-index: `dataset.type` is the Hub id where there is one (the Hub links it), else the local name.
    return [
        EvalResult(
            task_type=task,
            dataset_type=dataset_id or dataset,
            dataset_name=dataset,
            dataset_config=dataset_config,
            dataset_split=dataset_split,
            metric_type=name,
            metric_name=(metric_names or {}).get(name, name),
            metric_value=float(value) if isinstance(value, (int, float)) else value,
        )
        for name, value in metrics.items()
    ]


def _result_key(result: EvalResult) -> tuple:
    """What a new result replaces: the same task, dataset (config, split) and metric."""
    return (result.task_type, result.dataset_name, result.dataset_config, result.dataset_split, result.metric_type)


def _dataset_cell(result: EvalResult) -> str:
    details = ", ".join(part for part in (result.dataset_config, result.dataset_split) if part)
    return f"{result.dataset_name} ({details})" if details else result.dataset_name


def write_card(folder: str | Path, card: CardSpec) -> ModelCard:
    """Write `folder/README.md` from `card`: a `huggingface_hub.ModelCard` for the model saved in `folder` (which may
    be the temporary folder of `atomic_output_dir`; the card then names the target folder). Returns the card."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot write a model card: model folder '{folder}' does not exist.")
    model_name = card.model_name or model_name_for(folder)
    tags = list(dict.fromkeys([*ALWAYS_TAGS, *card.tags]))
    bases = _base_leaves(card.base_model)
    license = card.license
    inherited = check_license(license, "license") is None
    if inherited:
        licenses = {license_of(base) for base in bases}
        license = licenses.pop() if len(licenses) == 1 else None
    not_evaluated = card.not_evaluated
    if not_evaluated is None:
        not_evaluated = EVAL_HINT if card.pipeline_tag == ZERO_SHOT else "Not evaluated yet."
    eval_results, untyped = None, card.metrics
    if card.metrics and card.metrics_task and card.metrics_dataset:
        eval_results, untyped = _eval_results(card.metrics, card.metrics_task, card.metrics_dataset), None
    usage = card.usage if card.usage is not None else default_usage_for(card.pipeline_tag)
    card_data = ModelCardData(
        base_model=_flat_base_models(card.base_model),
        license=license,
        tags=tags,
        pipeline_tag=card.pipeline_tag,
        library_name="transformers",
        model_name=model_name,
        eval_results=eval_results,
    )
    model_card = ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=model_name,
        description=card.description or DEFAULT_DESCRIPTION,
        how_built=card.how_built.strip(),
        usage=(usage.code(model_name) if isinstance(usage, Usage) else usage).strip(),
        usage_intro=(
            "The model code travels with the weights, so no hf-moe install is needed; `trust_remote_code=True` runs "
            "the `*.py` files of this repository."
            if any(folder.glob("*.py"))
            else "An ordinary transformers model: neither remote code nor an hf-moe install is needed."
        ),
        metrics_table=_metrics_table(eval_results or [], untyped, not_evaluated),
        license_text=_license_text(license, inherited, bases),
    )
    model_card.save(folder / "README.md")
    return model_card


def write_model_card(folder: str | Path, **card) -> ModelCard:
    """`write_card(folder, CardSpec(**card))`: the card of `folder` from `CardSpec`'s fields as keywords."""
    return write_card(folder, CardSpec(**card))


def write_training_card(output_dir: str | Path, training_args, card: CardSpec) -> ModelCard:
    """The card of a training command's output folder: `card`, named after `--hub_model_id` (default: the folder)
    and licensed `--license` (default: the base models' own)."""
    return write_card(output_dir, card.replace(model_name=training_args.hub_model_id, license=training_args.license))


def add_eval_results(
    folder: str | Path,
    metrics: dict,
    *,
    task: str,
    dataset: str,
    dataset_id: str | None = None,
    dataset_config: str | None = None,
    dataset_split: str | None = None,
    metric_names: dict | None = None,
) -> ModelCard | None:
    """Merge `metrics` (`{metric: value}`) measured on `dataset` for `task` into the card of the local model
    folder `folder`: card-data `eval_results` (the model-index; replacing earlier values of the same task, dataset,
    config, split and metric) and the evaluation table in the body. Only float scores are recorded (counts such as
    `num_images` are not results). A no-op (logged) when `folder` is not a local folder with a card.

    `dataset` is the name shown (a Hub id, or a local folder's name); `dataset_id` the Hub dataset id, recorded as
    the model-index `dataset.type` (default: `dataset`); `dataset_config` / `dataset_split` its `config` / `split`;
    `metric_names` display names per metric key (`{"mean_per_class_accuracy": "Mean per-class accuracy"}`)."""
    card_path = Path(folder) / "README.md"
    if not card_path.is_file():
        logger.info(f"'{folder}' is not a local model folder with a model card; the results are not recorded there.")
        return None
    metrics = {name: value for name, value in metrics.items() if isinstance(value, float)}
    if not metrics:
        return None
    card = ModelCard.load(card_path)
    new = _eval_results(metrics, task, dataset, dataset_id, dataset_config, dataset_split, metric_names)
    replaced = {_result_key(r) for r in new}
    kept = [r for r in card.data.eval_results or [] if _result_key(r) not in replaced]
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
