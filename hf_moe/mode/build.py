"""`hf-moe mode build`: one MoDE model from the trained data experts and the clusters (see
`hf_moe.conversion.build_mode`).

    hf-moe mode build EXPERT [EXPERT ...] --clusters DIR --output_dir OUT [--clustering_encoder NAME]
        [--ensemble_formula released|paper] [--paper_lambda 0.2] [--dtype auto|float32|bfloat16|float16]
        [--max_shard_size 5GB] [--overwrite] [--push_to_hub ...]
"""

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from ..arguments import HubArguments, parse_command_line
from ..conversion import build_mode
from ..modeling.configuration_mode import ENSEMBLE_FORMULAS


@dataclass
class BuildArguments:
    clusters: str = field(metadata={"help": "Folder of `hf-moe mode cluster` (clusters.json, centers.safetensors)."})
    output_dir: str = field(metadata={"help": "Folder to write the MoDE model to (must be new or empty)."})
    clustering_encoder: str | None = field(
        default=None,
        metadata={"help": "The text encoder the clusters were made with (default: the one clusters.json names)."},
    )
    ensemble_formula: str = field(
        default="released",
        metadata={
            "help": "Task weights: released (the official code's formula) or paper.",
            "choices": list(ENSEMBLE_FORMULAS),
        },
    )
    paper_lambda: float = field(default=0.2, metadata={"help": "lambda of the paper's formula."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype of the written weights (default: the first expert's).",
            "choices": ["auto", "float32", "bfloat16", "float16"],  # hf_moe.checkpoint_io.DTYPE_CHOICES
        },
    )
    max_shard_size: str = field(default="5GB", metadata={"help": "Shard the weights above this size (with an index)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(
        (BuildArguments, HubArguments), prog="hf-moe mode build", description=build_mode.__doc__.split("\n")[0]
    )
    parser.add_argument(
        "experts",
        nargs="+",
        metavar="EXPERT",
        help="The CLIP data experts, expert k = cluster k (checked against each `mode train-expert` job record).",
    )
    args, hub_args, positional = parse_command_line(parser, argv)
    build_mode(positional.experts, **vars(args), hub=hub_args, return_model=False)
    print(f"Built a {len(positional.experts)}-expert MoDE model in {args.output_dir}")
