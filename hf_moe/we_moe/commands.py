"""WEMoE's `hf-moe` sub-commands. Only the standard library is imported here: `hf-moe --help` reads `COMMANDS`
without importing torch or transformers; each command imports its module when it runs.

    hf-moe merge --method average|task_arithmetic|ties PRETRAINED FINETUNED [FINETUNED ...] --output_dir DIR
        [--scaling 0.3 --ties_density 0.2 --ties_trim task_vector|tensor]
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from ..clip_moe.commands import HubArguments


@dataclass
class MergeArguments:
    method: str = field(metadata={"help": "Merge method: average, task_arithmetic, ties (or one registered later)."})
    output_dir: str = field(metadata={"help": "Folder to write the merged model to (must be new or empty)."})
    scaling: float | None = field(
        default=None, metadata={"help": "lambda of task_arithmetic / ties: theta_0 + lambda * merged tau (0.3)."}
    )
    ties_density: float | None = field(
        default=None, metadata={"help": "ties: fraction of each task vector kept by magnitude (0.2)."}
    )
    ties_trim: str | None = field(
        default=None, metadata={"help": "ties: trim over the whole task vector (task_vector, default) or per tensor."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


def merge_command(argv: list[str]) -> None:
    from transformers import HfArgumentParser

    from ..merging import merge_clip_vision

    parser = HfArgumentParser(
        (MergeArguments, HubArguments), prog="hf-moe merge", description=merge_clip_vision.__doc__.split("\n")[0]
    )
    parser.add_argument("pretrained", metavar="PRETRAINED", help="Pretrained CLIP (Hub id or folder).")
    parser.add_argument("finetuned", nargs="+", metavar="FINETUNED", help="Fine-tunes of PRETRAINED.")
    args, hub_args, positional = parser.parse_args_into_dataclasses(argv)
    names = {"scaling": "scaling", "ties_density": "density", "ties_trim": "trim"}
    options = {names[key]: getattr(args, key) for key in names if getattr(args, key) is not None}
    merge_clip_vision(
        args.method,
        positional.pretrained,
        positional.finetuned,
        args.output_dir,
        overwrite=args.overwrite,
        **vars(hub_args),
        **options,
    )
    print(f"Merged {len(positional.finetuned)} model(s) by {args.method} into {args.output_dir}")


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "merge": (merge_command, "Merge fine-tuned CLIP vision towers (average, task_arithmetic, ties) into one model."),
}
