"""Library output that tells an `hf-moe` user nothing, cut once for every command (issue 14).

- DeepSpeed announces "Setting accelerator to CPU" whenever it is imported on a machine without a GPU, and accelerate
  imports it for every `save_pretrained` once it is installed (`extract_model_from_parallel`), so a command that never
  uses DeepSpeed printed it. The notice is dropped unless DeepSpeed is asked for.
- transformers draws a "Loading weights" / "Writing model shards" bar for every model load and save: a toy MCL run
  drew 14 of them. Commands report their own phases (data check, features, training); those bars are turned off.
  Hub downloads keep huggingface_hub's bars, and the Trainer's bar is its own.

Only the standard library is imported here, so that the command line stays fast.
"""

import logging
import os
from pathlib import Path


DEEPSPEED_LOGGER = "DeepSpeed"
_DEEPSPEED_CPU_NOTICE = "Setting accelerator to"


def _drop_deepspeed_cpu_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_DEEPSPEED_CPU_NOTICE)


def deepspeed_requested(argv: list[str]) -> bool:
    """Whether a command line asks for DeepSpeed: a `--deepspeed` flag, a JSON / YAML options file that sets
    `deepspeed`, or an accelerate launch configured for it."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes"):
        return True
    for arg in argv:
        if arg.startswith("--deepspeed"):
            return True
        if arg.endswith((".json", ".yaml", ".yml")) and Path(arg).is_file():
            try:
                if "deepspeed" in Path(arg).read_text(encoding="utf-8", errors="replace"):
                    return True
            except OSError:
                continue
    return False


def quiet_library_noise(argv: list[str]) -> None:
    """Cut the library output described in the module docstring, for a command run with `argv`."""
    if not deepspeed_requested(argv):
        # A filter, not a level: DeepSpeed sets its logger's level itself when it is imported (after this).
        deepspeed_logger = logging.getLogger(DEEPSPEED_LOGGER)
        if _drop_deepspeed_cpu_notice not in deepspeed_logger.filters:
            deepspeed_logger.addFilter(_drop_deepspeed_cpu_notice)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
