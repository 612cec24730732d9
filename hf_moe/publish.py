"""The write step of every command that builds a model: `write_model` saves the model, its processor and its card
into a fresh folder atomically, then uploads the folder if asked; `check_destination` checks the folder and the
Hub repo before any work.

A converter is a composition check -> build -> write (DESIGN.md, rule 2):

    def my_converter(base, output_dir, ..., overwrite=False, hub: HubArguments | None = None):
        check_options(...)                                   # check: refuse bad options, naming them
        hub = check_destination(output_dir, overwrite, [base], hub)
        model = build(...)                                   # build: a model or a `checkpoint_io.StreamedModel`
        card = CardSpec(base_model=base, how_built=..., tags=(...), usage=MY_USAGE, description=...)
        write_model(model, output_dir, card=card, processor=load_processor(base), hub=hub,
                    overwrite=overwrite, inputs=[base])     # write: atomic folder, processor, card, optional push

Its command passes the parsed `HubArguments` (`--push_to_hub`, `--hub_model_id`, `--hub_token`,
`--hub_private_repo`, `--license`) as `hub=`. The card's model name is the repo pushed to, else the output folder's
name; its license is `--license`, else the base models' own (`hf_moe.cards.write_card`).
"""

import functools
import warnings
from collections.abc import Iterable
from dataclasses import fields, replace
from pathlib import Path

from transformers.utils import logging

from .arguments import HubArguments
from .cards import MODEL_ONLY_USAGE, CardSpec, write_card
from .fileio import atomic_output_dir, check_output_dir
from .hub import check_hub_model_id, push_to_hub


logger = logging.get_logger(__name__)


def check_destination(
    output_dir: str | Path, overwrite: bool = False, inputs: Iterable = (), hub: HubArguments | None = None
) -> HubArguments:
    """The checks of where a model goes, before any work: `output_dir` (empty or absent unless `overwrite`, holding
    none of `inputs`, not being written by another run) and the Hub repo when pushing. Returns `hub` (default: no
    push) with the repo to push to filled in (default: the output folder's name)."""
    check_output_dir(output_dir, overwrite, inputs=inputs)
    hub = HubArguments() if hub is None else hub
    return replace(hub, hub_model_id=check_hub_model_id(output_dir, hub.push_to_hub, hub.hub_model_id))


def hub_keywords(function):
    """Decorator keeping a converter's older call form: the Hub and card options passed one by one
    (`push_to_hub=True, hub_model_id=..., license=...`, as before `hub=` existed) are gathered into
    `hub=HubArguments(...)` with a FutureWarning. Without it, a converter taking `**kwargs` (upcycle_clip's model
    options, merge_clip_vision's method options) would pass them on as something else."""
    names = {option.name for option in fields(HubArguments)}

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        given = {name: kwargs.pop(name) for name in sorted(names & kwargs.keys())}
        if given:
            if kwargs.get("hub") is not None:
                raise TypeError(
                    f"{function.__name__}() got Hub options both in hub= and as keywords ({', '.join(given)})."
                )
            spelled = ", ".join(f"{name}=..." for name in given)
            warnings.warn(
                f"{function.__name__}(): pass the Hub and card options as hub=HubArguments({spelled}) (from "
                "hf_moe.arguments); the keywords one by one will stop working in a later release.",
                FutureWarning,
                stacklevel=2,
            )
            kwargs["hub"] = HubArguments(**given)
        return function(*args, **kwargs)

    return wrapper


def write_model(
    model,
    output_dir: str | Path,
    *,
    card: CardSpec | None = None,
    processor=None,
    hub: HubArguments | None = None,
    overwrite: bool = False,
    inputs: Iterable = (),
) -> Path:
    """Write `model.save_pretrained`, `processor` and `card` atomically to `output_dir` (nothing is left behind on
    error), then upload the folder when `hub.push_to_hub`. Returns `output_dir`.

    Args:
        model: A `PreTrainedModel`, or a `hf_moe.checkpoint_io.StreamedModel` (a meta-device model whose weights
            are written tensor by tensor).
        card: What the card says (`hf_moe.cards.CardSpec`). Its model name defaults to the repo pushed to, else the
            output folder's name; its license to `hub.license`. A folder without a processor gets a snippet that
            loads the model alone, unless the card gives its own.
        processor: Saved beside the model (None: none).
        hub: The Hub and card options of the command (`HubArguments`); default: no push.
        inputs: Local folders of the command's inputs, which `output_dir` may not hold.
    """
    hub = HubArguments() if hub is None else hub
    if card is not None:
        card = card.replace(
            model_name=card.model_name or hub.hub_model_id or Path(output_dir).name,
            license=card.license or hub.license,
            usage=MODEL_ONLY_USAGE if processor is None and card.usage is None else card.usage,
        )
    with atomic_output_dir(output_dir, overwrite, inputs=inputs) as tmp:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        if card is not None:
            write_card(tmp, card)
    if hub.push_to_hub:
        repo = check_hub_model_id(output_dir, True, hub.hub_model_id)
        push_to_hub(output_dir, repo, token=hub.hub_token, private=hub.hub_private_repo)
    return Path(output_dir)
