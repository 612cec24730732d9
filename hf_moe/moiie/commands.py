"""MoIIE's `hf-moe` sub-commands. Only the standard library is imported here: `hf-moe --help` reads `COMMANDS`
without importing torch or transformers; each command imports its module when it runs.

    hf-moe upcycle-moiie --base PHI3_OR_LLAVA [--vision SIGLIP] --num_vision_experts 1 --num_shared_experts 2
        --num_language_experts 1 --top_k 2 --output_dir DIR [--variant moiie|vanilla|modality|dense]
        [--projector FOLDER] [--moe_layers 1 3 ...] [--image_token_id ID] [--seed 0] [--dtype auto|bfloat16|...]
    hf-moe train-moiie --model DIR --data CONVERSATIONS.json --image_folder DIR --output_dir OUT
        --stage pretrain|finetune [--moe_only] [TrainingArguments flags]
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from ..arguments import HubArguments, parse_command_line


@dataclass
class UpcycleMoIIEArguments:
    base: str = field(
        metadata={
            "aliases": ["--llm"],
            "help": "Dense Phi-3 (Phi3ForCausalLM) to upcycle, or a dense LLaVA-style folder (then no --vision).",
        }
    )
    output_dir: str = field(metadata={"help": "Folder to write the MoIIE model to (must be new or empty)."})
    vision: str | None = field(default=None, metadata={"help": "SigLIP (SiglipVisionModel or SiglipModel)."})
    num_vision_experts: int = field(default=1, metadata={"help": "Vision-only experts per MoE layer."})
    num_shared_experts: int = field(default=2, metadata={"help": "Shared (inter-modality) experts per MoE layer."})
    num_language_experts: int = field(default=1, metadata={"help": "Language-only experts per MoE layer."})
    top_k: int = field(default=2, metadata={"help": "Experts per token of each router."})
    variant: str = field(default="moiie", metadata={"help": "moiie, vanilla, modality or dense."})
    moe_layers: list[int] | None = field(
        default=None, metadata={"help": "MoE decoder-layer indices (default: the odd ones).", "nargs": "+"}
    )
    projector: str | None = field(
        default=None, metadata={"help": "Folder with the mlp2x_gelu projector weights (default: random init)."}
    )
    image_token_id: int | None = field(default=None, metadata={"help": "Image placeholder token id."})
    seed: int = field(default=0, metadata={"help": "Seed of the router (and random projector) initialisation."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype of the written weights (default: the language model's).",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    max_shard_size: str = field(default="5GB", metadata={"help": "Shard the weights above this size (with an index)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


def upcycle_moiie_command(argv: list[str]) -> None:
    from transformers import HfArgumentParser

    from ..conversion import upcycle_moiie

    parser = HfArgumentParser(
        (UpcycleMoIIEArguments, HubArguments),
        prog="hf-moe upcycle-moiie",
        description=" ".join(upcycle_moiie.__doc__.split("\n\n")[0].split()),
    )
    args, hub_args = parse_command_line(parser, argv)
    options = vars(args)
    base, vision, output_dir = options.pop("base"), options.pop("vision"), options.pop("output_dir")
    upcycle_moiie(base, vision, output_dir, **options, hub=hub_args, return_model=False)
    print(f"Upcycled {base} into the {args.variant} MoIIE model {output_dir}")


def train_moiie_command(argv: list[str]) -> None:
    from .train import main as train_moiie_main

    output_dir = train_moiie_main(argv)
    print(f"The trained MoIIE model is in {output_dir}")


def demo(output_dir: str) -> None:
    """MoIIE's part of `hf-moe demo` (writes OUTPUT_DIR/moiie)."""
    from pathlib import Path

    from .demo import run_demo

    run_demo(Path(output_dir) / "moiie")


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "upcycle-moiie": (upcycle_moiie_command, "Upcycle a dense Phi-3 + SigLIP (or a dense LLaVA folder) into MoIIE."),
    "train-moiie": (train_moiie_command, "Train MoIIE: stage pretrain (projector) or finetune (LLM + MoE)."),
}
