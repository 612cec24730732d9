"""`hf-moe mode cluster`: MoDE's two-step clustering of the caption embeddings, and the assignment of every pair.

    hf-moe mode cluster --data SHARDS --num_experts N --output_dir DIR [--embeddings EMB]
        [--num_fine_clusters 1024] [--fine_sample_size S] [--tolerance 0.1] [--seed 0] [encoder options]

1. Without `--embeddings`, the captions are first embedded into `DIR/embeddings` (`hf-moe mode embed`, with the
   encoder options given here).
2. The embeddings are L2-normalised; balanced k-means with `num_fine_clusters` centers runs on a random sample of
   `fine_sample_size` of them (all by default), then balanced k-means of the fine centers into `num_experts` coarse
   centers; each fine center belongs to the expert of its nearest coarse center.
3. Every pair goes to its nearest fine center (in chunks; embedding shard i is assigned by process
   `i % num_processes`), and its expert is that center's.

Outputs (read by `hf-moe mode train-expert` and `hf-moe mode build`):

- `DIR/centers.safetensors`: `fine_centers` (m, D) float32, `coarse_centers` (n, D) float32, `fine_to_coarse` (m,)
  int64; centers live in the space of the normalised embeddings;
- `DIR/assignments/part-{i:05d}.parquet`: columns `key` (the pair key, `hf_moe.mode.data.pair_key`), `fine` and
  `coarse` (int32), one part per embedding shard;
- `DIR/clusters.json`: m, n, the encoder, seed, tolerance, sample size, number of pairs, pairs per expert, the
  smallest and largest fine cluster over all pairs (`fine_sizes_min_max`) and over the balanced sample
  (`sample_fine_sizes_min_max`). Written last: its presence means the clustering is complete.

Before the job is recorded, `--embeddings` must be a complete `hf-moe mode embed` output of `--data`, and every
shard is read once: a NaN or infinite embedding is refused naming its shard file, row and pair key.

Every file is written atomically. A killed run resumes: the centers, once saved, are reused, and only missing
assignment parts are computed. The options and the data's fingerprint are recorded in `DIR/hf_moe_job.json`, and a
re-run with other options or changed data is refused.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import HfArgumentParser
from transformers.utils import logging

from ..arguments import parse_command_line
from ..clustering import assign, cluster
from ..fileio import atomic_output_file, check_output_dir
from ..training import JOB_FILE, TrainingJob, input_fingerprint, local_path
from .cluster_files import CENTERS_FILE, CLUSTERS_FILE
from .data import ASSIGNMENTS_DIR, read_assignments
from .embed import (
    EMBED_FILE,
    NOT_RESULT_OPTIONS,
    EmbedArguments,
    EncoderArguments,
    check_encoder_arguments,
    embed_captions,
    process_state,
    shard_path,
)


logger = logging.get_logger(__name__)

# MoDE's clustering, by back-end name (`hf_moe.clustering`): balanced k-means for the fine and the coarse centers (the
# paper's), and the nearest-center assignment by `assign`'s "auto" (faiss's exact search where faiss is installed and
# the centers are on the CPU, torch otherwise: the same labels, to ties at float rounding).
CLUSTERING_METHOD = "balanced_kmeans"
ASSIGNMENT_BACKEND = "auto"


@dataclass
class ClusterArguments:
    data: str = field(
        metadata={"help": "Image-text pairs: tar shards (folder, glob or brace pattern), img2dataset or image folder."}
    )
    num_experts: int = field(metadata={"help": "Coarse clusters n: one data expert each."})
    output_dir: str = field(metadata={"help": "Folder of the clusters, centers and assignments."})
    embeddings: str | None = field(
        default=None,
        metadata={
            "help": "Caption embeddings of the data from `hf-moe mode embed`; by default they are computed into "
            "OUTPUT_DIR/embeddings with the encoder options."
        },
    )
    num_fine_clusters: int = field(default=1024, metadata={"help": "Fine clusters m (the paper: 1024)."})
    fine_sample_size: int | None = field(
        default=None,
        metadata={"help": "Pairs sampled for the fine k-means (default all; the paper: 100M of 400M, 10M fits a GPU)."},
    )
    tolerance: float = field(default=0.1, metadata={"help": "Balanced k-means: allowed relative cluster size spread."})
    seed: int = field(default=0, metadata={"help": "Seed of the sample and of the k-means initialisation."})
    chunk_size: int = field(default=65536, metadata={"help": "Points per distance computation (memory bound)."})


def check_cluster_arguments(args: ClusterArguments) -> None:
    """Errors that need no data, raised before anything is read or written."""
    if args.num_experts < 1:
        raise ValueError(f"--num_experts must be at least 1, got {args.num_experts}.")
    if args.num_fine_clusters < args.num_experts:
        raise ValueError(
            f"--num_experts {args.num_experts} exceeds --num_fine_clusters {args.num_fine_clusters}: each expert is a "
            "group of fine clusters."
        )
    if args.fine_sample_size is not None and args.fine_sample_size < 1:
        raise ValueError(f"--fine_sample_size must be at least 1, got {args.fine_sample_size}.")
    if args.tolerance < 0:
        raise ValueError(f"--tolerance must be non-negative, got {args.tolerance}.")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk_size must be at least 1, got {args.chunk_size}.")


def embedding_shards(embeddings_dir: str | Path) -> list[tuple[Path, int]]:
    """`(path, rows)` of each shard of a complete `hf-moe mode embed` output, after checking that every shard is
    there, non-empty, holds one key per row, and has the dimension of the first."""
    embeddings_dir = Path(embeddings_dir)
    if not (embeddings_dir / EMBED_FILE).is_file():
        raise FileNotFoundError(
            f"{embeddings_dir} holds no {EMBED_FILE}: it is not a complete `hf-moe mode embed` output (run or finish "
            "`hf-moe mode embed` into it)."
        )
    summary = json.loads((embeddings_dir / EMBED_FILE).read_text())
    shards, dim = [], None
    for index in range(summary["num_shards"]):
        path = shard_path(embeddings_dir, index)
        if not path.is_file():
            raise FileNotFoundError(f"Embedding shard {path} is missing: re-run `hf-moe mode embed` to redo it.")
        with safe_open(str(path), framework="pt") as handle:
            shape = handle.get_slice("embeddings").get_shape()
            num_keys = len(json.loads(handle.metadata()["keys"]))
        if len(shape) != 2 or shape[0] == 0:
            raise ValueError(f"Embedding shard {path} is empty (shape {shape}): remove it and re-run the embedding.")
        if num_keys != shape[0]:
            raise ValueError(f"Embedding shard {path} has {shape[0]} rows but {num_keys} keys.")
        if dim is not None and shape[1] != dim:
            raise ValueError(
                f"Embedding shard {path} has dimension {shape[1]}, but {shards[0][0]} has {dim}: the shards come "
                "from different encoders."
            )
        dim = shape[1]
        shards.append((path, shape[0]))
    return shards


def read_shard(path: Path) -> tuple[list[str], torch.Tensor]:
    """The keys and L2-normalised float32 embeddings of an embedding shard; a row that is not finite is refused,
    named by the shard file, its row and its pair key (k-means would silently put it in cluster 0)."""
    with safe_open(str(path), framework="pt") as handle:
        keys = json.loads(handle.metadata()["keys"])
        embeddings = handle.get_tensor("embeddings").float()
    bad = (~torch.isfinite(embeddings)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        row = bad[0]
        key = keys[row] if row < len(keys) else None
        raise ValueError(
            f"Embedding shard {path}: row {row} (pair key {key!r}) holds NaN or infinite values"
            + (f", and {len(bad) - 1} more row(s) of the shard do" if len(bad) > 1 else "")
            + ": the encoder overflowed on that caption (embed in float32) or the shard is damaged; remove the shard "
            "and re-run `hf-moe mode embed` into its folder."
        )
    return keys, torch.nn.functional.normalize(embeddings, dim=-1)


def check_embeddings_dir(embeddings: str | Path, data: str) -> None:
    """Refuse an `--embeddings` folder that is not a complete `hf-moe mode embed` output, saying what it holds."""
    folder = Path(embeddings)
    command = f"`hf-moe mode embed --data {data} --output_dir {embeddings}`"
    if not folder.is_dir():
        raise FileNotFoundError(f"--embeddings {embeddings} does not exist: compute the embeddings first ({command}).")
    if not (folder / EMBED_FILE).is_file():
        shards = sorted(folder.glob("embeddings-*.safetensors"))
        what = (
            f"holds {len(shards)} embedding shard(s) but no {EMBED_FILE}: the embedding did not finish"
            if shards
            else f"holds no {EMBED_FILE} and no embedding shard: it is not a `hf-moe mode embed` output"
        )
        raise FileNotFoundError(f"--embeddings {embeddings} {what}. Run (or finish) {command}.")
    if not (folder / JOB_FILE).is_file():
        raise FileNotFoundError(
            f"--embeddings {embeddings} holds no {JOB_FILE}, which records the data it was computed from: it is not "
            f"a `hf-moe mode embed` output (or an incomplete copy of one). Re-run {command}."
        )


def cluster_job(args: ClusterArguments, encoder_args: EncoderArguments, embeddings_dir: Path) -> TrainingJob:
    options = {k: v for k, v in vars(args).items() if k not in ("data", "output_dir", "embeddings", "chunk_size")}
    inputs = {"data": input_fingerprint(args.data)}
    if args.embeddings is None:
        options.update({k: v for k, v in vars(encoder_args).items() if k not in NOT_RESULT_OPTIONS})
        options["encoder"] = local_path(encoder_args.encoder)
    else:
        options["embeddings"] = local_path(args.embeddings)
        if (embeddings_dir / EMBED_FILE).is_file():
            inputs["embeddings"] = json.loads((embeddings_dir / EMBED_FILE).read_text())
    return TrainingJob(
        args.output_dir, "mode-cluster", options, inputs, owned_outputs=(CENTERS_FILE, CLUSTERS_FILE, ASSIGNMENTS_DIR)
    )


def _check_same_data(args: ClusterArguments, embeddings_dir: Path) -> None:
    job_file = embeddings_dir / JOB_FILE
    recorded = json.loads(job_file.read_text()).get("inputs", {}).get("data") if job_file.is_file() else None
    if recorded is None:
        raise ValueError(
            f"{job_file} records no data the embeddings in {embeddings_dir} were computed from: embed this data "
            f"(`hf-moe mode embed --data {args.data} --output_dir {embeddings_dir}`) first."
        )
    current = input_fingerprint(args.data)
    if recorded != current:
        raise ValueError(
            f"The embeddings in {embeddings_dir} were not computed from {args.data} as it is now: {job_file} records "
            f"data of {_describe_data(recorded)}, --data is {_describe_data(current)}. Embed this data "
            f"(`hf-moe mode embed --data {args.data}`) first."
        )


def _describe_data(fingerprint: dict) -> str:
    if "files" in fingerprint:
        return f"{fingerprint['files']} files, {fingerprint['bytes']:,} bytes (sha256 {fingerprint['sha256'][:12]})"
    return repr(fingerprint.get("name"))


def cluster_pairs(args: ClusterArguments, encoder_args: EncoderArguments) -> Path:
    """Run the clustering (see the module docstring) and return the output folder."""
    check_cluster_arguments(args)
    output_dir = check_output_dir(args.output_dir, overwrite=True, inputs=[args.data])
    state = process_state()
    embeddings_dir = Path(args.embeddings) if args.embeddings else output_dir / "embeddings"
    job = cluster_job(args, encoder_args, embeddings_dir)
    job.check()
    if job.is_complete() and (output_dir / CLUSTERS_FILE).is_file():
        logger.warning(f"The clustering in {output_dir} is complete: nothing to do.")
        return output_dir
    if args.embeddings is not None:
        check_embeddings_dir(args.embeddings, args.data)
    else:
        check_encoder_arguments(encoder_args)
    if args.embeddings is None:
        embed_captions(EmbedArguments(data=args.data, output_dir=str(embeddings_dir)), encoder_args)
    _check_same_data(args, embeddings_dir)
    shards = embedding_shards(embeddings_dir)
    num_pairs = sum(rows for _, rows in shards)
    sample_size = min(args.fine_sample_size or num_pairs, num_pairs)
    if args.num_fine_clusters > sample_size:
        raise ValueError(
            f"--num_fine_clusters {args.num_fine_clusters} exceeds the {sample_size} sampled pairs "
            f"({num_pairs} pairs in {embeddings_dir}): lower it or sample more (--fine_sample_size)."
        )
    centers_path = output_dir / CENTERS_FILE
    fitted = None
    if not centers_path.is_file() and state.is_main_process:
        # Before the job is recorded: the fit reads every shard, so damaged embeddings are refused with nothing
        # written.
        fitted = _fit_centers(args, shards, sample_size, state.device)
    job.record()
    state.wait_for_everyone()

    if fitted is not None:
        centers, sample_sizes = fitted
        with atomic_output_file(centers_path) as tmp:
            save_file(centers, tmp, metadata={"sample_fine_sizes_min_max": json.dumps(sample_sizes)})
    state.wait_for_everyone()
    centers = load_file(centers_path)
    fine_centers = centers["fine_centers"].to(state.device)

    mine = [index for index in range(len(shards)) if index % state.num_processes == state.process_index]
    for index in tqdm(mine, desc="Assigning pairs", unit="shard", disable=not state.is_local_main_process):
        part = output_dir / ASSIGNMENTS_DIR / f"part-{index:05d}.parquet"
        if part.is_file():
            continue
        keys, points = read_shard(shards[index][0])
        fine, _ = assign(points, fine_centers, backend=ASSIGNMENT_BACKEND, chunk_size=args.chunk_size)
        fine = fine.cpu()
        _write_part(part, keys, fine, centers["fine_to_coarse"][fine])
    state.wait_for_everyone()

    if state.is_main_process:
        with safe_open(str(centers_path), framework="pt") as handle:
            sample_sizes = json.loads(handle.metadata()["sample_fine_sizes_min_max"])
        summary = _summary(args, output_dir, embeddings_dir, num_pairs, sample_size, sample_sizes)
        with atomic_output_file(output_dir / CLUSTERS_FILE) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
        job.mark_complete()
    state.wait_for_everyone()
    return output_dir


def _fit_centers(args: ClusterArguments, shards, sample_size: int, device) -> tuple[dict, list[int]]:
    """Fine centers on a sample, coarse centers of the fine ones, and the fine -> coarse map."""
    num_pairs = sum(rows for _, rows in shards)
    generator = torch.Generator().manual_seed(args.seed)
    sample = torch.randperm(num_pairs, generator=generator)[:sample_size].sort().values
    points, start = [], 0
    for path, rows in tqdm(shards, desc="Reading the sample", unit="shard"):
        picked = sample[(sample >= start) & (sample < start + rows)] - start
        # Every shard is read, sampled or not, so that a non-finite row anywhere is refused before any output.
        embeddings = read_shard(path)[1]
        if len(picked):
            points.append(embeddings[picked])
        start += rows
    # The sample stays in host memory; balanced_kmeans moves one chunk at a time to the device.
    points = torch.cat(points)
    kwargs = {"tolerance": args.tolerance, "seed": args.seed, "chunk_size": args.chunk_size, "device": device}
    logger.info(f"Fine balanced k-means: {args.num_fine_clusters} centers on {len(points)} pairs.")
    fine_labels, fine_centers = cluster(points, args.num_fine_clusters, method=CLUSTERING_METHOD, **kwargs)
    logger.info(f"Coarse balanced k-means: {args.num_experts} centers of the {args.num_fine_clusters} fine centers.")
    _, coarse_centers = cluster(fine_centers, args.num_experts, method=CLUSTERING_METHOD, **kwargs)
    # MoDE maps a fine cluster to its NEAREST coarse center, not to its balanced coarse label.
    fine_to_coarse, _ = assign(fine_centers, coarse_centers, backend=ASSIGNMENT_BACKEND, chunk_size=args.chunk_size)
    sizes = torch.bincount(fine_labels.cpu(), minlength=args.num_fine_clusters)
    centers = {
        "fine_centers": fine_centers.float().cpu().contiguous(),
        "coarse_centers": coarse_centers.float().cpu().contiguous(),
        "fine_to_coarse": fine_to_coarse.long().cpu().contiguous(),
    }
    return centers, [int(sizes.min()), int(sizes.max())]


def _write_part(path: Path, keys: list[str], fine: torch.Tensor, coarse: torch.Tensor) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "fine": pa.array(fine.numpy().astype("int32")),
            "coarse": pa.array(coarse.numpy().astype("int32")),
        }
    )
    with atomic_output_file(path) as tmp:
        pq.write_table(table, tmp)


def _summary(args, output_dir: Path, embeddings_dir: Path, num_pairs, sample_size, sample_sizes) -> dict:
    table = read_assignments(output_dir, ("fine", "coarse"))
    if table.num_rows != num_pairs:
        raise RuntimeError(f"The assignments in {output_dir} hold {table.num_rows} pairs, expected {num_pairs}.")
    fine = torch.from_numpy(table.column("fine").to_numpy().astype("int64"))
    coarse = torch.from_numpy(table.column("coarse").to_numpy().astype("int64"))
    fine_sizes = torch.bincount(fine, minlength=args.num_fine_clusters)
    return {
        "num_fine_clusters": args.num_fine_clusters,
        "num_experts": args.num_experts,
        "encoder": json.loads((embeddings_dir / EMBED_FILE).read_text())["encoder"],
        "seed": args.seed,
        "tolerance": args.tolerance,
        "fine_sample_size": sample_size,
        "num_pairs": num_pairs,
        "expert_sizes": torch.bincount(coarse, minlength=args.num_experts).tolist(),
        "fine_sizes_min_max": [int(fine_sizes.min()), int(fine_sizes.max())],
        "sample_fine_sizes_min_max": sample_sizes,
    }


def main(argv: list[str] | None = None) -> Path:
    parser = HfArgumentParser((ClusterArguments, EncoderArguments), prog="hf-moe mode cluster")
    args, encoder_args = parse_command_line(parser, argv)
    output_dir = cluster_pairs(args, encoder_args)
    logger.warning(f"Clusters, centers and assignments are in {output_dir}.")
    return output_dir
