"""`hf-moe mode embed`: the caption embedding of every image-text pair, the input of MoDE's clustering.

    hf-moe mode embed --data SHARDS --output_dir EMB [--encoder princeton-nlp/sup-simcse-bert-base-uncased]
        [--pooling pooler|cls|mean|clip] [--max_length 77] [--batch_size 256] [--shard_size 100000]

Captions are read in a fixed order without decoding an image and cut into shards of `shard_size` captions; shard i
is embedded by process `i % num_processes` (`accelerate launch` spreads the work; one process works too) and written
atomically to `EMB/embeddings-{i:05d}.safetensors`:

- tensor `embeddings`: `(rows, dim)` float32, NOT normalised (MoDE normalises at clustering time); float32 rather
  than float16 so that a shard equals the encoder's output, at 3 KB per pair for a 768-d encoder;
- metadata `keys`: the JSON list of the rows' pair keys (`hf_moe.mode.data.pair_key`), in the tensor's order.

A killed run resumes: complete shards are kept (they are written under a temporary name and renamed), the others are
embedded again. The options and a fingerprint of the data and the encoder are recorded in `EMB/hf_moe_job.json`;
a re-run with other options or changed data is refused. `EMB/embed.json` (encoder, pooling, max_length, dim, count,
num_shards, shard_size, dtype) is written last, when every shard is there.
"""

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPModel, HfArgumentParser
from transformers.utils import logging

from ..arguments import parse_command_line
from ..conversion.build_mode import check_encoder_pooling
from ..fileio import atomic_output_file, check_output_dir
from ..loading import check_safetensors_file, load_config, load_pretrained
from ..modeling.modeling_mode import CLUSTERING_POOLINGS, clustering_text_embeddings
from ..training import TrainingJob, input_fingerprint, local_path, model_fingerprint
from .data import read_captions


logger = logging.get_logger(__name__)

EMBED_FILE = "embed.json"
SHARD_PATTERN = "embeddings-*.safetensors"
DEFAULT_ENCODER = "princeton-nlp/sup-simcse-bert-base-uncased"


@dataclass
class EncoderArguments:
    """How captions are embedded (shared by `hf-moe mode embed` and `hf-moe mode cluster`)."""

    encoder: str = field(
        default=DEFAULT_ENCODER,
        metadata={"help": "Text encoder (Hub id or folder): the paper's supervised SimCSE BERT, or a CLIP for 'clip'."},
    )
    pooling: str = field(
        default="pooler",
        metadata={
            "help": "pooler: the encoder's pooler output (SimCSE's); cls: first token; mean: masked mean of the last "
            "hidden states; clip: CLIP text features (a CLIP model folder).",
            "choices": list(CLUSTERING_POOLINGS),
        },
    )
    max_length: int = field(default=77, metadata={"help": "Caption length limit in tokens (longer are truncated)."})
    batch_size: int = field(default=256, metadata={"help": "Captions per forward pass (per process)."})
    shard_size: int = field(default=100_000, metadata={"help": "Captions per embedding shard (the unit of resume)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the encoder to run its own model code."})


@dataclass
class EmbedArguments:
    data: str = field(
        metadata={"help": "Image-text pairs: tar shards (folder, glob or brace pattern), img2dataset or image folder."}
    )
    output_dir: str = field(metadata={"help": "Folder of the embedding shards."})


# Options that do not change the embeddings: `batch_size` (up to float rounding) and how trusting the loader is.
NOT_RESULT_OPTIONS = ("batch_size", "trust_remote_code")


def process_state() -> PartialState:
    """accelerate's process state, distributed also on machines without an accelerator: `PartialState()` there
    ignores torchrun's world size (every process would believe it is the only one) unless told to use the CPU."""
    return PartialState(cpu=not torch.accelerator.is_available())


def shard_path(output_dir: str | Path, index: int) -> Path:
    return Path(output_dir) / f"embeddings-{index:05d}.safetensors"


def read_shard_keys(path: str | Path) -> list[str]:
    """The pair keys of an embedding shard (from its header only)."""
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["keys"])


def embed_job(args: EmbedArguments, encoder_args: EncoderArguments) -> TrainingJob:
    options = {k: v for k, v in vars(encoder_args).items() if k not in NOT_RESULT_OPTIONS}
    options["encoder"] = local_path(encoder_args.encoder)
    return TrainingJob(
        args.output_dir,
        "mode-embed",
        options,
        inputs={"data": input_fingerprint(args.data), "encoder": model_fingerprint(encoder_args.encoder)},
        owned_outputs=(SHARD_PATTERN, EMBED_FILE),
    )


def check_encoder_arguments(encoder_args: EncoderArguments) -> None:
    """The encoder options, and the encoder's kind against `--pooling` (from its config; no weights are read),
    checked before anything is written."""
    if encoder_args.pooling not in CLUSTERING_POOLINGS:
        raise ValueError(f"--pooling {encoder_args.pooling!r} is not one of {list(CLUSTERING_POOLINGS)}.")
    for name in ("max_length", "batch_size", "shard_size"):
        if getattr(encoder_args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(encoder_args, name)}.")
    config = load_config(encoder_args.encoder, trust_remote_code=encoder_args.trust_remote_code, require_moe=False)
    check_encoder_pooling(config, encoder_args.encoder, encoder_args.pooling, flag="--pooling")


def load_encoder(encoder_args: EncoderArguments):
    """`(model, tokenizer)`: a `CLIPModel` for pooling "clip", else the `AutoModel` of the encoder."""
    auto_class = CLIPModel if encoder_args.pooling == "clip" else None
    model = load_pretrained(encoder_args.encoder, auto_class, trust_remote_code=encoder_args.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(encoder_args.encoder, trust_remote_code=encoder_args.trust_remote_code)
    return model.eval(), tokenizer


@torch.inference_mode()
def embed_texts(model, tokenizer, texts: list[str], encoder_args: EncoderArguments) -> torch.Tensor:
    """`(len(texts), dim)` float32 unnormalised clustering embeddings, in batches of `encoder_args.batch_size`."""
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(texts), encoder_args.batch_size):
        batch = tokenizer(
            texts[start : start + encoder_args.batch_size],
            padding=True,
            truncation=True,
            max_length=encoder_args.max_length,
            return_tensors="pt",
        )
        outputs.append(
            clustering_text_embeddings(
                model, batch["input_ids"].to(device), batch["attention_mask"].to(device), encoder_args.pooling
            ).cpu()
        )
    return torch.cat(outputs)


def embed_captions(args: EmbedArguments, encoder_args: EncoderArguments) -> Path:
    """Embed every caption of `args.data` into shards in `args.output_dir` (see the module docstring); returns the
    output folder. Resumes an interrupted run of the same job; returns at once if it is complete."""
    check_encoder_arguments(encoder_args)
    output_dir = check_output_dir(args.output_dir, overwrite=True, inputs=[args.data])
    state = process_state()
    job = embed_job(args, encoder_args)
    job.check()
    if job.is_complete() and _all_shards_present(output_dir):
        logger.warning(f"The caption embeddings in {output_dir} are complete: nothing to do.")
        return output_dir
    model, tokenizer = load_encoder(encoder_args)
    model.to(state.device)
    captions = read_captions(args.data)
    first = next(captions, None)
    if first is None:
        raise ValueError(f"{args.data} holds no pair with a caption: nothing to embed.")
    job.record()
    # No process may write a shard before the job is recorded: `TrainingJob.check` would take it for another run's.
    state.wait_for_everyone()

    shards = _batched(itertools.chain([first], captions), encoder_args.shard_size)
    count, todo_done, num_shards = 0, 0, 0
    with tqdm(desc="Embedding captions", unit="caption", disable=not state.is_local_main_process) as progress:
        for index, shard in enumerate(shards):
            num_shards, count = index + 1, count + len(shard)
            path = shard_path(output_dir, index)
            # Every process reads every caption (reading is cheap next to the encoder) so that the shards, and
            # which process embeds which, depend on neither the number of processes nor on what is already done.
            if index % state.num_processes != state.process_index or _is_complete_shard(path):
                progress.update(len(shard))
                continue
            keys, texts = zip(*shard)
            embeddings = embed_texts(model, tokenizer, list(texts), encoder_args)
            bad = (~torch.isfinite(embeddings)).any(dim=1).nonzero().flatten().tolist()
            if bad:
                raise ValueError(
                    f"The encoder '{encoder_args.encoder}' gave NaN or infinite embeddings for {len(bad)} caption(s) "
                    f"of shard {path.name}, the first at row {bad[0]} (pair key {keys[bad[0]]!r}, caption "
                    f"{texts[bad[0]][:80]!r}): nothing of this shard is written. Is the encoder's checkpoint damaged, "
                    "or does it overflow in its dtype?"
                )
            with atomic_output_file(path) as tmp:
                save_file({"embeddings": embeddings.contiguous()}, tmp, metadata={"keys": json.dumps(list(keys))})
            todo_done += 1
            progress.update(len(shard))
    logger.info(f"Process {state.process_index} embedded {todo_done} of {num_shards} shards.")
    state.wait_for_everyone()
    if state.is_main_process:
        summary = _summarize(output_dir, num_shards, count, encoder_args)
        with atomic_output_file(output_dir / EMBED_FILE) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
        job.mark_complete()
    state.wait_for_everyone()
    return output_dir


def _all_shards_present(output_dir: Path) -> bool:
    if not (output_dir / EMBED_FILE).is_file():
        return False
    num_shards = json.loads((output_dir / EMBED_FILE).read_text())["num_shards"]
    return all(shard_path(output_dir, index).is_file() for index in range(num_shards))


def _batched(iterable, size: int):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _is_complete_shard(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        check_safetensors_file(path)
    except OSError as err:  # shards are renamed into place complete, so this is damage after the fact
        logger.warning(f"Embedding {path} again: {err}")
        return False
    return True


def _summarize(output_dir: Path, num_shards: int, count: int, encoder_args: EncoderArguments) -> dict:
    """embed.json's content, after checking that the shards hold `count` distinct keys of one dimension."""
    seen, dim, rows = set(), None, 0
    for index in range(num_shards):
        path = shard_path(output_dir, index)
        with safe_open(str(path), framework="pt") as handle:
            shape = handle.get_slice("embeddings").get_shape()
            keys = json.loads(handle.metadata()["keys"])
        dim = shape[1] if dim is None else dim
        rows += shape[0]
        for key in keys:
            if key in seen:
                raise ValueError(f"Pair key {key!r} occurs twice (the second time in {path}): keys must be unique.")
            seen.add(key)
    if rows != count:
        raise RuntimeError(f"The shards in {output_dir} hold {rows} rows, but {count} captions were read.")
    return {
        "encoder": {
            "name_or_path": local_path(encoder_args.encoder),
            "pooling": encoder_args.pooling,
            "max_length": encoder_args.max_length,
        },
        "dim": dim,
        "count": count,
        "num_shards": num_shards,
        "shard_size": encoder_args.shard_size,
        "dtype": "float32",
    }


def main(argv: list[str] | None = None) -> Path:
    parser = HfArgumentParser((EmbedArguments, EncoderArguments), prog="hf-moe mode embed")
    args, encoder_args = parse_command_line(parser, argv)
    output_dir = embed_captions(args, encoder_args)
    logger.warning(f"Caption embeddings are in {output_dir}.")
    return output_dir
