"""Command-line argument groups shared by every family's `hf-moe` commands (standard library only, so that
`hf-moe --help` stays free of torch and transformers)."""

from dataclasses import dataclass, field


@dataclass
class HubArguments:
    """The Hub options of commands that write a model (the names and meanings of `TrainingArguments`')."""

    push_to_hub: bool = field(default=False, metadata={"help": "Upload the written folder to the Hub."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Repo to push to (NAMESPACE/NAME; default: the output folder's name)."}
    )
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    hub_private_repo: bool | None = field(
        default=None, metadata={"help": "Create the repo private (default: the organisation's default)."}
    )
