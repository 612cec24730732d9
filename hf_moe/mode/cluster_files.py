"""The folder `hf-moe mode cluster` writes, as the later steps read it: its file names, `read_cluster_folder` (the
files checked) and `clusters_id` (their content fingerprint). `hf-moe mode cluster` writes it
(`hf_moe.mode.cluster`); `hf-moe mode train-expert` and `hf-moe mode build` read it.

- `centers.safetensors` (`CENTERS_FILE`): `fine_centers` (m, D) float32, `coarse_centers` (n, D) float32,
  `fine_to_coarse` (m,) int64;
- `clusters.json` (`CLUSTERS_FILE`): m, n, the encoder and the counts (written last: its presence means the
  clustering is complete);
- `assignments/` (`hf_moe.mode.data.ASSIGNMENTS_DIR`): the fine and coarse cluster of every pair.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from ..loading import check_safetensors_file
from ..modeling.configuration_mode import CLUSTERING_POOLINGS


CLUSTERS_FILE = "clusters.json"
CENTERS_FILE = "centers.safetensors"


def read_cluster_folder(clusters: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """`clusters.json` and the tensors of `centers.safetensors` of a `hf-moe mode cluster` folder (what
    `cluster_pairs` writes), their keys and shapes checked (not yet against the experts or the encoder), each error
    naming the file and key. `hf-moe mode train-expert` and `hf-moe mode build` read the clusters through it."""
    folder = load_cluster_folder(clusters)
    return folder.info, folder.centers


@dataclass(frozen=True)
class ClusterFolder:
    """A `hf-moe mode cluster` folder read once: `clusters.json` (`info`), the tensors of `centers.safetensors` and
    the `clusters_id` of exactly these bytes (a check against it cannot see other files than the ones used)."""

    info: dict
    centers: dict[str, torch.Tensor]
    id: str


def load_cluster_folder(clusters: str | Path) -> ClusterFolder:
    """`read_cluster_folder` with the folder's `clusters_id`, each file read once."""
    folder = Path(clusters)
    info_path, centers_path = folder / CLUSTERS_FILE, folder / CENTERS_FILE
    for path in (info_path, centers_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: --clusters must be a folder written by `hf-moe mode cluster`.")
    info = json.loads(info_path.read_text())
    for key in ("num_fine_clusters", "num_experts", "encoder"):
        if key not in info:
            raise ValueError(f"{info_path} has no '{key}'.")
    for key in ("name_or_path", "pooling", "max_length"):
        if key not in info["encoder"]:
            raise ValueError(f"{info_path} has no 'encoder.{key}'.")
    if info["encoder"]["pooling"] not in CLUSTERING_POOLINGS:
        raise ValueError(
            f"{info_path}: 'encoder.pooling' is {info['encoder']['pooling']!r}, not one of {CLUSTERING_POOLINGS}."
        )
    check_safetensors_file(centers_path)
    data = centers_path.read_bytes()
    centers = safetensors.torch.load(data)
    missing = {"fine_centers", "fine_to_coarse"} - set(centers)
    if missing:
        raise ValueError(f"{centers_path} has no tensor(s) {sorted(missing)}.")
    m, n = info["num_fine_clusters"], info["num_experts"]
    fine, fine_to_coarse = centers["fine_centers"], centers["fine_to_coarse"]
    if fine.dim() != 2 or fine.shape[0] != m:
        raise ValueError(f"{centers_path}: 'fine_centers' has shape {tuple(fine.shape)}, expected ({m}, dim).")
    if fine_to_coarse.shape != (m,) or fine_to_coarse.dtype != torch.int64:
        raise ValueError(
            f"{centers_path}: 'fine_to_coarse' is {fine_to_coarse.dtype} {tuple(fine_to_coarse.shape)}, expected "
            f"int64 ({m},)."
        )
    bad = fine_to_coarse[(fine_to_coarse < 0) | (fine_to_coarse >= n)]
    if bad.numel():
        raise ValueError(
            f"{centers_path}: 'fine_to_coarse' holds {sorted(set(bad.tolist()))}, outside the {n} experts [0, {n})."
        )
    return ClusterFolder(info, centers, _fingerprint(data, info))


def clusters_id(clusters: str | Path) -> str:
    """A content fingerprint of a `hf-moe mode cluster` folder: the sha256 of `centers.safetensors` (the fine and
    coarse centers and the fine -> coarse map, from which every assignment follows) and of the counts in
    `clusters.json`. Unlike `hf_moe.training.input_fingerprint` it reads the files, so a copied or moved clusters
    folder keeps it, and another run's clusters (other data, seed or options) do not share it.

    `hf-moe mode train-expert` records it in each expert's job record; `hf-moe mode build` compares it with the
    clusters it is given."""
    folder = Path(clusters)
    return _fingerprint((folder / CENTERS_FILE).read_bytes(), json.loads((folder / CLUSTERS_FILE).read_text()))


def _fingerprint(centers: bytes, info: dict) -> str:
    """`clusters_id` from the bytes of `centers.safetensors` and the parsed `clusters.json`."""
    digest = hashlib.sha256(centers)
    counts = {key: info.get(key) for key in ("num_fine_clusters", "num_experts", "num_pairs", "expert_sizes")}
    digest.update(json.dumps(counts, sort_keys=True).encode())
    return digest.hexdigest()[:32]
