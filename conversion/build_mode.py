"""Build one MoDE model from N trained CLIP data experts and the caption clusters they were trained on.

The output folder holds the experts, the fine cluster centers with their experts and the clustering text encoder in
one safetensors checkpoint, plus the experts' image processor and a tokenizer that tokenizes every text for both the
experts and the clustering encoder (`MoDETokenizer`; a plain CLIP tokenizer when the clustering encoder is a CLIP),
so that `pipeline("zero-shot-image-classification", model=OUT, trust_remote_code=True)` ensembles the experts with
weights from the candidate labels.

    hf-moe mode build EXPERT [EXPERT ...] --clusters DIR --output_dir OUT [--clustering_encoder NAME]
        [--ensemble_formula released|paper]
"""

import json
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, CLIPProcessor, CLIPTextModelWithProjection
from transformers.utils import logging

from ..arguments import HubArguments
from ..cards import CardSpec, Usage, command_line
from ..checkpoint_io import (
    DEFAULT_MAX_SHARD_SIZE,
    LazyCheckpoint,
    StreamedModel,
    loading_key_mapping,
    planned_state_dict,
    resolve_dtype,
)
from ..evaluation import DEFAULT_TEMPLATES
from ..loading import check_model_type, load_config, load_processor
from ..merging import CLIPCheckpoint
from ..mode.cluster_files import CENTERS_FILE, CLUSTERS_FILE, clusters_id, load_cluster_folder
from ..modeling.configuration_mode import ENSEMBLE_FORMULAS, MoDEConfig
from ..modeling.modeling_mode import MoDEModel
from ..modeling.tokenization_mode import MoDETokenizer
from ..publish import check_destination, hub_keywords, write_model
from ..training import JOB_FILE


logger = logging.get_logger(__name__)

# The command that `hf-moe mode train-expert` records in each expert's job record (`hf_moe.training.JOB_FILE`).
EXPERT_JOB_COMMAND = "mode train-expert"
# Config entries, at any depth (the towers' configs carry them too), that say where a checkpoint came from, how it
# was initialised or trained, or what its forward returns, not what it computes: a trained expert saved in float32
# next to its seed saved without a dtype is the same architecture.
NOT_ARCHITECTURE = {
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
    "auto_map",
    "_name_or_path",
    "name_or_path",
    "_commit_hash",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_experts_implementation",
    "attn_implementation",
    "initializer_range",
    "initializer_factor",
    "logit_scale_init_value",
    "dropout",
    "attention_dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_cache",
    "torchscript",
    "id2label",
    "label2id",
    "problem_type",
}


def _without_provenance(value):
    if isinstance(value, dict):
        return {key: _without_provenance(item) for key, item in value.items() if key not in NOT_ARCHITECTURE}
    return value


def _architecture(config) -> dict:
    # to_dict rather than to_diff_dict: a field one checkpoint spells out at its default and another omits is no
    # difference.
    return _without_provenance(config.to_dict())


def _config_diff(reference: dict, other: dict, prefix: str = "") -> list[str]:
    differences = []
    for key in sorted(set(reference) | set(other)):
        a, b = reference.get(key), other.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            differences.append(f"{prefix}{key}: {a!r} vs {b!r}")
    return differences


def check_experts(experts: list[str], num_experts: int, clusters_json: Path):
    """The experts' common CLIP config, after checking there is one expert per coarse cluster and that all are
    CLIPs of one architecture (the first difference named)."""
    if len(experts) != num_experts:
        raise ValueError(
            f"{len(experts)} expert(s) given but {clusters_json} has 'num_experts' {num_experts}: pass one EXPERT "
            "per coarse cluster, in cluster order."
        )
    configs = [load_config(expert, require_moe=False) for expert in experts]
    for expert, config in zip(experts, configs):
        check_model_type(config, expert, ("clip",), "an EXPERT of `hf-moe mode build` (a dense CLIPModel)")
    reference = _architecture(configs[0])
    for expert, config in zip(experts[1:], configs[1:]):
        differences = _config_diff(reference, _architecture(config))
        if differences:
            raise ValueError(
                f"Expert '{expert}' differs in architecture from '{experts[0]}' ({'; '.join(differences[:3])}): "
                "MoDE experts share one architecture."
            )
    return configs[0]


def check_expert_records(experts: list[str], clusters: str | Path, expected_id: str | None = None) -> None:
    """Refuse experts that would end up mismatched to their clusters, from the job record `hf-moe mode train-expert`
    leaves in each expert's folder: expert k must have been trained as `--expert k`, on these clusters (their
    `clusters_id`, `expected_id` when the caller has read them already), to completion; and no expert may be given
    twice.

    An expert without such a record (a CLIP trained elsewhere, a Hub id) cannot be checked: it is accepted with a
    warning, since `check_experts` already matched the number of experts to the clusters'."""
    by_path, by_index, unchecked = {}, {}, []
    for k, expert in enumerate(experts):
        check_folder_given_once(expert, k, by_path)
        record_path, record = read_expert_record(expert)
        if record is None:
            unchecked.append(expert)
            continue
        options = record.get("options") or {}
        index = options.get("expert")
        if index in by_index:
            raise ValueError(
                f"Experts '{by_index[index]}' and '{expert}' were both trained as expert {index} (their "
                f"{JOB_FILE} record 'expert' {index}): the same expert is given twice."
            )
        by_index[index] = expert
        check_expert_record(expert, k, record_path, record)
        recorded_id = options.get("clusters_id")
        if recorded_id is None:
            logger.warning(
                f"Expert '{expert}': {record_path} records no 'clusters_id' (trained by an older hf-moe), so whether "
                f"it was trained on the clusters in {clusters} cannot be checked."
            )
            continue
        expected_id = expected_id or clusters_id(clusters)
        if recorded_id != expected_id:
            raise ValueError(
                f"Expert '{expert}' was trained on other clusters: {record_path} records 'clusters_id' "
                f"{recorded_id!r}, but the clusters in {clusters} have {expected_id!r} (another `hf-moe mode "
                "cluster` run, or clusters made again). Pass the --clusters its experts were trained on, or train "
                "the experts on these clusters."
            )
    if unchecked:
        logger.warning(
            f"{len(unchecked)} expert(s) hold no `hf-moe mode train-expert` job record ({JOB_FILE}): "
            f"{', '.join(unchecked)}. Their order, and the clusters they were trained on, cannot be checked: make sure "
            f"expert k was trained on coarse cluster k of {clusters}."
        )


def check_folder_given_once(expert: str, k: int, seen: dict) -> None:
    """Refuse expert folder `expert` (given as expert `k`) when `seen` (resolved folder -> index) holds it already."""
    path = Path(expert).expanduser()
    if not path.is_dir():
        return
    resolved = path.resolve()
    if resolved in seen:
        raise ValueError(
            f"Expert folder '{expert}' is given twice (as expert {seen[resolved]} and expert {k}): pass "
            "each coarse cluster's own expert, in cluster order."
        )
    seen[resolved] = k


def read_expert_record(expert: str) -> tuple[Path, dict | None]:
    """The path of `expert`'s job record and the record, None when it is not one of `hf-moe mode train-expert`."""
    record_path = Path(expert).expanduser() / JOB_FILE
    try:
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
    except ValueError as err:
        raise ValueError(f"Expert '{expert}': {record_path} is not valid JSON ({err}).") from err
    if not isinstance(record, dict) or record.get("command") != EXPERT_JOB_COMMAND:
        return record_path, None
    return record_path, record


def check_expert_record(expert: str, k: int, record_path: Path, record: dict) -> None:
    """Refuse expert `k` whose job record says it was trained as another expert, or not to completion."""
    index = (record.get("options") or {}).get("expert")
    if index != k:
        raise ValueError(
            f"Expert '{expert}' is given as expert {k}, but {record_path} records 'expert' {index!r}: it was "
            f"trained on coarse cluster {index!r}. Pass the EXPERTs in cluster order (expert k trained with "
            "`--expert k`)."
        )
    if not record.get("complete"):
        raise ValueError(
            f"Expert '{expert}' is not finished: its job record {record_path} is not marked complete (re-run "
            "its `hf-moe mode train-expert` command to finish it)."
        )


def check_encoder_pooling(config, encoder: str, pooling: str, flag: str = "pooling") -> None:
    """Refuse a clustering encoder that the pooling cannot embed with: "clip" takes a CLIPModel (its text
    features), every other pooling a text encoder's hidden states (a joint CLIP needs images to run whole)."""
    if pooling == "clip":
        check_model_type(config, encoder, ("clip",), f"the clustering encoder of {flag} 'clip' (CLIP text features)")
    elif config.model_type == "clip":
        raise ValueError(
            f"The clustering encoder '{encoder}' is a CLIP ('clip'): its captions are embedded with {flag} 'clip' "
            f"(its text features), not {pooling!r}, which takes a text encoder such as a BERT."
        )


def clustering_encoder_config(encoder: str, pooling: str):
    """The config of the clustering encoder as the MoDE model stores it (a CLIP's text tower with projection for the
    "clip" pooling) and its output dim."""
    config = load_config(encoder, require_moe=False)
    check_encoder_pooling(config, encoder, pooling, flag="the clusters' pooling")
    if pooling == "clip":
        text = config.text_config
        text.projection_dim = config.projection_dim
        return text, config.projection_dim
    return config, config.hidden_size


@hub_keywords
def build_mode(
    experts: list[str | Path],
    clusters: str | Path,
    output_dir: str | Path,
    *,
    clustering_encoder: str | None = None,
    ensemble_formula: str = "released",
    paper_lambda: float = 0.2,
    overwrite: bool = False,
    dtype: str = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    return_model: bool = True,
    hub: HubArguments | None = None,
) -> MoDEModel:
    """Build a `MoDEModel` from trained CLIP data experts and the clusters of `hf-moe mode cluster`.

    Args:
        experts: Hub ids or folders of the `CLIPModel` experts, expert k trained on coarse cluster k. An expert
            folder of `hf-moe mode train-expert` is checked against its job record: trained as `--expert k`, on
            these clusters (`clusters_id`), to completion; no expert may be given twice. An expert without a
            record (trained elsewhere) is accepted with a warning.
        clusters: The clusters folder (`clusters.json`, `centers.safetensors`).
        output_dir: New or empty folder (`overwrite=True` replaces a non-empty one); may not hold an input.
        clustering_encoder: The text encoder the clusters were made with (default: `encoder.name_or_path` of
            `clusters.json`), e.g. a local copy of it.
        ensemble_formula: "released" (the official code's weights) or "paper".
        paper_lambda: lambda of the paper's formula.
        dtype: Dtype of the written weights: "auto" (the first expert's, as `from_pretrained` loads it),
            "float32", "bfloat16" or "float16".
        max_shard_size: Larger outputs are written as shards of at most this size with an index.
        return_model: Load the written model and return it; False returns None (the command line's choice).
        hub: The Hub and card options (`HubArguments`: `push_to_hub` uploads the written folder to `hub_model_id`,
            default the name of `output_dir`; `license` is the card's, default the base models' own where their
            cards state one). Default: no push.

    The experts and the clustering encoder are read one tensor at a time and the model written tensor by tensor
    (`hf_moe.checkpoint_io`); only an encoder whose checkpoint names do not map onto its model is loaded whole.

    Returns:
        The model, loaded from `output_dir` (saved atomically with the image processor, the tokenizer(s) and a
        model card); None when `return_model=False`.
    """
    experts = [str(expert) for expert in experts]
    plan = check_build_mode(
        experts,
        clusters,
        output_dir,
        clustering_encoder,
        overwrite=overwrite,
        dtype=dtype,
        hub=hub,
        ensemble_formula=ensemble_formula,
        paper_lambda=paper_lambda,
    )
    with ExitStack() as opened:  # the checkpoints the build reads from, closed however it ends
        model, produce = build_mode_model(plan, experts, dtype, opened)
        write_model(
            StreamedModel(model, produce, max_shard_size=max_shard_size),
            output_dir,
            card=mode_card(experts, clusters, output_dir, plan, dtype),
            processor=mode_processor(experts[0], plan.config),
            hub=plan.hub,
            overwrite=overwrite,
            inputs=[*experts, plan.config.clustering_encoder_name_or_path, clusters],
        )
    logger.info(f"Saved a {len(experts)}-expert MoDE model to {output_dir}")
    return MoDEModel.from_pretrained(output_dir).eval() if return_model else None


@dataclass
class BuildPlan:
    """What `check_build_mode` found: the clusters folder's `clusters.json` and centers, the MoDE config to build
    and the repo to push to."""

    info: dict
    centers: dict[str, torch.Tensor]
    config: MoDEConfig
    hub: HubArguments


def check_build_mode(
    experts: list[str], clusters, output_dir, clustering_encoder, *, overwrite, dtype, hub, **mode
) -> BuildPlan:
    """Every check before a weight is read and anything is written: the options, the clusters folder (read once,
    here), the output folder and Hub repo, the experts (their architectures and job records) and the clustering
    encoder against the clusters. `mode`: `ensemble_formula` and `paper_lambda`."""
    if not experts:
        raise ValueError("build_mode needs at least one EXPERT.")
    if mode["ensemble_formula"] not in ENSEMBLE_FORMULAS:
        raise ValueError(f"ensemble_formula must be one of {ENSEMBLE_FORMULAS}, got {mode['ensemble_formula']!r}.")
    folder = load_cluster_folder(clusters)
    info, centers = folder.info, folder.centers
    encoder = str(clustering_encoder or info["encoder"]["name_or_path"])
    pooling, max_length = info["encoder"]["pooling"], int(info["encoder"]["max_length"])
    resolve_dtype(dtype, torch.float32)  # an unknown name is refused before any work
    hub = check_destination(output_dir, overwrite, [*experts, encoder, clusters], hub)

    expert_config = check_experts(experts, info["num_experts"], Path(clusters) / CLUSTERS_FILE)
    check_expert_records(experts, clusters, folder.id)
    encoder_config, dim = clustering_encoder_config(encoder, pooling)
    if centers["fine_centers"].shape[1] != dim:
        raise ValueError(
            f"{Path(clusters) / CENTERS_FILE}: 'fine_centers' have dim {centers['fine_centers'].shape[1]} but the "
            f"clustering encoder '{encoder}' ({pooling} pooling) embeds in {dim}: the clusters were made with another "
            "encoder (pass it as --clustering_encoder)."
        )
    config = MoDEConfig(
        expert_config=expert_config.to_dict(),
        num_experts=len(experts),
        num_fine_clusters=info["num_fine_clusters"],
        clustering_encoder_config=encoder_config.to_dict(),
        clustering_encoder_name_or_path=encoder,
        clustering_pooling=pooling,
        clustering_max_length=max_length,
        # The zero-shot pipeline averages each class name over these for the task weights, as the released code
        # and `hf-moe eval` (whose default templates these are) do.
        task_templates=list(DEFAULT_TEMPLATES),
        **mode,
    )
    return BuildPlan(info, centers, config, hub)


def build_mode_model(plan: BuildPlan, experts: list[str], dtype: str, opened: ExitStack):
    """The MoDE model on the meta device and its `produce(name)` for `StreamedModel` (`mode_producer`), reading the
    experts' and the clustering encoder's checkpoints, which `opened` closes."""
    expert_checkpoints = []
    for expert in experts:
        expert_checkpoints.append(opened.enter_context(closing(CLIPCheckpoint(expert))))
    output_dtype = resolve_dtype(dtype, expert_checkpoints[0].dtype)
    with torch.device("meta"):
        model = MoDEModel(plan.config)
    model = model.to(output_dtype).eval()
    model.config.name_or_path = ""
    encoder = plan.config.clustering_encoder_name_or_path
    encoder_class = CLIPTextModelWithProjection if plan.config.clustering_pooling == "clip" else AutoModel
    encoder_source = opened.enter_context(closing(EncoderWeights(encoder, encoder_class, model.clustering_encoder)))
    specs = planned_state_dict(model)
    return model, mode_producer(specs, expert_checkpoints, encoder_source, plan.centers, output_dtype)


def mode_processor(expert: str, config: MoDEConfig):
    """The experts' image processor with a tokenizer for both the experts and the clustering encoder
    (`MoDETokenizer`), or the expert's own CLIP processor when the clustering encoder is a CLIP."""
    processor = load_processor(expert)
    if config.clustering_pooling == "clip":
        return processor
    tokenizer = MoDETokenizer.from_pretrained(
        expert,
        clustering_tokenizer=AutoTokenizer.from_pretrained(config.clustering_encoder_name_or_path),
        clustering_max_length=config.clustering_max_length,
    )
    return CLIPProcessor(image_processor=processor.image_processor, tokenizer=tokenizer)


MODE_DESCRIPTION = (
    "MoDE (Ma et al., CVPR 2024), built with [hf-moe](https://github.com/hf-moe/hf-moe): CLIP data experts, each "
    "trained on one cluster of the captions, ensembled per task with weights from how close the task's class names "
    "lie to the caption clusters."
)
# Zero-shot classification, where the texts of one call are the classes of one task and set the experts' weights
# (printed), then the pipeline.
MODE_USAGE = Usage(
    body=(
        "# The texts of one call are the classes of one task: their closeness to the caption clusters weighs",
        "# the data experts, so pass all of a task's classes together.",
        'labels = ["a photo of a cat", "a photo of a dog", "a photo of a car"]',
        'inputs = processor(text=labels, images=image, return_tensors="pt", padding=True)',
        "with torch.no_grad():",
        "    outputs = model(**inputs)",
        "print(dict(zip(labels, outputs.logits_per_image.softmax(dim=-1)[0].tolist())))",
        'print("expert weights for this task:", outputs.task_weights.tolist())',
        "",
        'classifier = pipeline("zero-shot-image-classification", model=model_id, trust_remote_code=True)',
        "print(classifier(image, candidate_labels=labels))",
    )
)
MODE_NOT_EVALUATED = (
    "Not evaluated yet (`hf-moe mode report --model FOLDER --tasks TASK_DIR ...` and `hf-moe eval zero-shot --model "
    "FOLDER` add results here)."
)


def mode_card(experts, clusters, output_dir, plan: BuildPlan, dtype: str) -> CardSpec:
    """The card of a built MoDE: what it is, how it was built (`mode_how_built`), its usage."""
    config = plan.config
    how_built = mode_how_built(
        experts,
        clusters,
        config.clustering_encoder_name_or_path,
        config.clustering_pooling,
        plan.info,
        config.ensemble_formula,
        output_dir,
        dtype=dtype,
    )
    return CardSpec(
        base_model=experts,
        how_built=how_built,
        tags=("mode", "data-experts", "clip"),
        description=MODE_DESCRIPTION,
        usage=MODE_USAGE,
        not_evaluated=MODE_NOT_EVALUATED,
    )


class EncoderWeights:
    """The clustering encoder's weights as `encoder_class.from_pretrained(encoder)` loads them into `module` (its
    meta-device copy inside the MoDE model): read one tensor at a time when the checkpoint's names map onto the
    module's (`loading_key_mapping`) with the same shapes, else (names from_pretrained still resolves, tensors it
    initialises) loaded whole with `from_pretrained`, in float32, as the build always loaded it."""

    def __init__(self, encoder: str, encoder_class, module):
        self.encoder, self.encoder_class, self.state_dict = encoder, encoder_class, None
        self.specs = planned_state_dict(module)
        self.checkpoint = LazyCheckpoint(encoder, key_mapping=loading_key_mapping(module))
        fits = all(name in self.checkpoint and self.checkpoint.shape(name) == s.shape for name, s in self.specs.items())
        if not fits:
            logger.info(f"The clustering encoder '{encoder}' is loaded whole: its names do not map one to one.")
            self.checkpoint.close()
            self.checkpoint = None

    def get(self, name: str) -> torch.Tensor:
        if self.checkpoint is not None:
            return self.checkpoint.get(name)
        if self.state_dict is None:
            model = self.encoder_class.from_pretrained(self.encoder, dtype=torch.float32)
            self.state_dict = {key: tensor.detach() for key, tensor in model.state_dict().items()}
            del model
        return self.state_dict.pop(name)

    def close(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint.close()
        self.state_dict = None


def mode_producer(specs: dict, experts: list, encoder: EncoderWeights, centers: dict, output_dtype: torch.dtype):
    """`produce(name)` for `StreamedModel`: expert k's tensors from checkpoint k, the clustering encoder's from
    its checkpoint, the centers from the clusters folder, and the logit scale, the experts' mean scale (so that a
    single expert keeps its own), all in `output_dtype` (floating tensors pass through float32, as the build's
    float32 model held them). Raises for a tensor without a source, before anything is written."""

    def cast(tensor):
        return tensor.to(torch.float32).to(output_dtype) if tensor.is_floating_point() else tensor

    def logit_scale():
        scales = [expert.checkpoint.get("logit_scale").to(torch.float32) for expert in experts]
        return torch.stack([scale.exp() for scale in scales]).mean().log()

    sources = {}
    for name in specs:
        head, _, rest = name.partition(".")
        if head == "experts":
            index, _, rest = rest.partition(".")
            expert = experts[int(index)]
            if rest not in expert.specs:
                raise RuntimeError(f"MoDE tensor {name} has no counterpart in expert '{expert.name_or_path}'.")
            sources[name] = lambda expert=expert, rest=rest: expert.checkpoint.get(rest)
        elif head == "clustering_encoder" and rest in encoder.specs:
            sources[name] = lambda rest=rest: encoder.get(rest)
        elif name in ("fine_centers", "fine_to_coarse"):
            sources[name] = lambda name=name: centers[name]
        elif name == "logit_scale":
            sources[name] = logit_scale
        else:
            raise RuntimeError(f"MoDE tensor {name} has no source.")

    def produce(name: str) -> torch.Tensor:
        return cast(sources[name]())

    return produce


def mode_how_built(experts, clusters, encoder, pooling, info, ensemble_formula, output_dir, dtype="auto") -> str:
    listed = "\n".join(f"{k}. `{expert}`" for k, expert in enumerate(experts))
    options = {"clusters": clusters, "output_dir": output_dir, "clustering_encoder": encoder}
    options.update(ensemble_formula=ensemble_formula, dtype=None if dtype in (None, "auto") else dtype)
    command = command_line("mode build", experts, options)
    return (
        f"**MoDE** of {len(experts)} CLIP data experts over {info['num_fine_clusters']} fine caption clusters "
        f"(clustering encoder `{encoder}`, {pooling} pooling, seed {info.get('seed')}); task weights by the "
        f"{ensemble_formula} formula.\n\nExperts (expert k = coarse cluster k):\n\n{listed}\n\n"
        f"```bash\n{command}\n```"
    )


__all__ = ["build_mode"]
