"""Hub uploads of the folders hf-moe writes: `push_to_hub` (one line naming the saved folder and the `hf upload`
command when an upload fails) and `check_hub_model_id`, which checks the repo before any work.

Cards are built in `hf_moe.cards` and model folders written by `hf_moe.publish.write_model` (atomic save,
processor, card, then this module's push); the card names are re-exported here for older callers.
"""

import shlex
from pathlib import Path

import huggingface_hub.errors
from huggingface_hub import create_repo, upload_folder
from transformers.utils import logging

from .cards import (  # noqa: F401  (the card API, which lived here before `hf_moe.cards`)
    ALWAYS_TAGS,
    EVAL_HINT,
    METRICS_BEGIN,
    METRICS_END,
    CardSpec,
    Usage,
    add_eval_results,
    base_model_of,
    license_of,
    model_name_for,
    write_model_card,
)


logger = logging.get_logger(__name__)


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
