"""CLIP-MoE's `hf-moe` sub-commands. Only the standard library is imported here: `hf-moe --help` reads
`COMMANDS` without importing torch or transformers; each command imports its module when it runs.

    hf-moe upcycle-clip BASE [BASE ...] --num_experts N --top_k K --output_dir DIR [--long_text] [--push_to_hub]
        [--dtype auto|float32|bfloat16|float16] [--max_shard_size 5GB]
    hf-moe convert-clip-moe-original CHECKPOINT.pt --base BASE --output_dir DIR [--push_to_hub --hub_model_id ID]
    hf-moe mcl --base BASE --data DATA --num_experts N --output_dir DIR [TrainingArguments flags]
    hf-moe train-router --model DIR --data DATA --output_dir OUT [TrainingArguments flags]
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from ..arguments import HubArguments, parse_command_line


# `--dtype` of the converters (hf_moe.checkpoint_io.DTYPE_CHOICES; not imported: it would import torch).
DTYPES = ["auto", "float32", "bfloat16", "float16"]


@dataclass
class UpcycleClipArguments:
    output_dir: str = field(metadata={"help": "Folder to write the CLIP-MoE model to (must be new or empty)."})
    num_experts: int | None = field(
        default=None, metadata={"help": "Experts per MoE block (default: number of BASEs)."}
    )
    top_k: int = field(default=2, metadata={"help": "Experts each token is routed to."})
    long_text: bool = field(default=False, metadata={"help": "Stretch text positions 77 -> 248 (Long-CLIP)."})
    expert_dropout: float = field(default=0.0, metadata={"help": "Dropout inside experts (0.1 for router training)."})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Balance-loss weight."})
    text_moe_layers: list[int] | None = field(
        default=None, metadata={"help": "Indices of the text blocks that become MoE (default: all).", "nargs": "+"}
    )
    vision_moe_layers: list[int] | None = field(
        default=None, metadata={"help": "Indices of the vision blocks that become MoE (default: all).", "nargs": "+"}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random router initialisation."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Dtype of the written weights (default: the first base's).", "choices": DTYPES},
    )
    max_shard_size: str = field(default="5GB", metadata={"help": "Shard the weights above this size (with an index)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


@dataclass
class ConvertClipMoEOriginalArguments:
    base: str = field(metadata={"help": "Dense CLIP the checkpoint was built from (architecture + processor)."})
    output_dir: str = field(metadata={"help": "Folder to write the converted model to (must be new or empty)."})
    top_k: int = field(default=2, metadata={"help": "Experts per token (the official release uses 2)."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Dtype of the written weights (default: the release's, float32).", "choices": DTYPES},
    )
    max_shard_size: str = field(default="5GB", metadata={"help": "Shard the weights above this size (with an index)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


def upcycle_clip_command(argv: list[str]) -> None:
    from transformers import HfArgumentParser

    from ..conversion import upcycle_clip

    parser = HfArgumentParser(
        (UpcycleClipArguments, HubArguments), prog="hf-moe upcycle-clip", description=upcycle_clip.__doc__
    )
    parser.add_argument("bases", nargs="+", metavar="BASE", help="Dense CLIP checkpoints (Hub ids or folders).")
    args, hub_args, positional = parse_command_line(parser, argv)
    upcycle_clip(positional.bases, **vars(args), hub=hub_args, return_model=False)
    print(f"Upcycled {', '.join(positional.bases)} into {args.output_dir}")


def convert_clip_moe_original_command(argv: list[str]) -> None:
    from transformers import HfArgumentParser

    from ..conversion import convert_clip_moe_original

    parser = HfArgumentParser(
        (ConvertClipMoEOriginalArguments, HubArguments),
        prog="hf-moe convert-clip-moe-original",
        description="Convert an official CLIP-MoE .pt release (OpenAI-CLIP naming) into a CLIPMoEModel folder; --base "
        "must be the dense CLIP it was built from (model_type 'clip'; hf-moe models are refused).",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="Official CLIP-MoE .pt state dict.")
    args, hub_args, positional = parse_command_line(parser, argv)
    convert_clip_moe_original(positional.checkpoint, **vars(args), hub=hub_args, return_model=False)
    print(f"Converted {positional.checkpoint} into {args.output_dir}")


def mcl_command(argv: list[str]) -> None:
    from .mcl import main as mcl_main

    mcl_main(argv)


def train_router_command(argv: list[str]) -> None:
    from .train_router import main as train_router_main

    output_dir = train_router_main(argv)
    print(f"The router-trained CLIP-MoE is in {output_dir}")


def demo(output_dir: str) -> None:
    """CLIP-MoE's part of `hf-moe demo` (writes OUTPUT_DIR)."""
    from pathlib import Path

    from .demo import run

    run(Path(output_dir))


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "upcycle-clip": (upcycle_clip_command, "Upcycle dense CLIP checkpoint(s) into a CLIP-MoE model."),
    "convert-clip-moe-original": (convert_clip_moe_original_command, "Convert an official CLIP-MoE .pt release."),
    "mcl": (mcl_command, "MCL expert extraction from a dense CLIP, then the CLIP-MoE in DIR/moe."),
    "train-router": (train_router_command, "Train the routers of a CLIP-MoE (CLIP loss + balance loss)."),
}
