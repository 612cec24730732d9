"""Training helpers shared by every family's Trainer subclasses and training commands.

Re-running a training command must either continue the same job or refuse. `TrainingJob` records a job's
options and a fingerprint of its inputs in `OUTPUT_DIR/hf_moe_job.json` on the first run, refuses a re-run whose
options or inputs differ (naming each difference), and marks the job complete once its final model is saved, so
that a finished job is reported as done instead of trained again. `last_complete_checkpoint` resumes from the
newest Trainer checkpoint that was completely written, skipping one a kill interrupted.

A job holds its output folder's lock (`hf_moe.fileio.OutputDirLock`) from `TrainingJob.check` until it ends, so
that a second run on the same folder is refused instead of mixing its results and job record with the first's.
A re-run whose options or inputs differ starts over when the recorded job made no progress worth keeping (no
complete checkpoint: it failed early, e.g. on bad data), and is refused, saying how to start over, when it did.
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.utils import logging

from .fileio import OutputDirLock, atomic_output_file


logger = logging.get_logger(__name__)

JOB_FILE = "hf_moe_job.json"

# TrainingArguments that say where and how to report, save, evaluate or parallelise, not what is trained:
# a re-run may change them freely. Every other field (subclasses' own fields included) is part of the job.
NOT_RESULT_FIELDS = {
    "output_dir",
    "disable_tqdm",
    "report_to",
    "run_name",
    "project",
    "per_device_eval_batch_size",
    "prediction_loss_only",
    "include_for_metrics",
    "batch_eval_metrics",
    "bf16_full_eval",
    "fp16_full_eval",
    "enable_jit_checkpoint",
    "push_to_hub",
    "ignore_data_skip",
    "restore_callback_states_from_checkpoint",
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
    "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context",
    "debug",
    "skip_memory_metrics",
    "do_train",
    "do_eval",
    "do_predict",
    "resume_from_checkpoint",
    "local_rank",
    "gradient_checkpointing",
    "gradient_checkpointing_kwargs",
    "activation_checkpointing",
    "activation_checkpointing_kwargs",
    "torch_compile",
    "torch_compile_backend",
    "torch_compile_mode",
    "torch_empty_cache_steps",
    "include_num_input_tokens_seen",
    "use_cpu",
    "tf32",
    "deepspeed",
    "fsdp",
    "fsdp_config",
    "accelerator_config",
    "parallelism_config",
    "log_expert_load",
    "license",  # the card's, not the model's
}
NOT_RESULT_PREFIXES = ("logging_", "log_", "save_", "hub_", "eval_", "trackio_", "ddp_")


class JobMismatchError(ValueError):
    """A re-run whose options or inputs differ from the job recorded in its output folder."""


def result_options(*arguments, exclude: set[str] = frozenset()) -> dict:
    """The options of `arguments` (dataclass instances: script arguments, `TrainingArguments`) that change
    what is trained, as JSON values; `TrainingArguments` contribute their result-changing fields only, plus
    the number of processes (it sets the global batch)."""
    from transformers import TrainingArguments

    options = {}
    for args in arguments:
        if isinstance(args, TrainingArguments):
            values = {
                key: value
                for key, value in args.to_dict().items()
                if key not in NOT_RESULT_FIELDS and not key.startswith(NOT_RESULT_PREFIXES)
            }
            values["world_size"] = args.world_size
        else:
            values = dataclasses.asdict(args)
        options.update({key: value for key, value in values.items() if key not in exclude})
    # A JSON round trip so that recorded and current values compare alike (tuples -> lists, enums -> str).
    return json.loads(json.dumps(options, default=str))


def local_path(name_or_path: str | Path) -> str | Path:
    """An existing local path as an absolute path (so `./data` and `/abs/data` are one input); other names as
    they are."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


def input_fingerprint(name_or_path: str | Path, pattern: str = "**/*") -> dict:
    """A cheap fingerprint of an input: for a local file or folder, the count, total size and a hash of the
    relative names, sizes and modification times of its files matching `pattern` (no file is read); for a glob or
    brace pattern of shards (`shards/{00000..00099}.tar`), the same over the files it matches, named relative to
    the deepest folder holding them all; for a Hub id, the id.

    Moving a folder keeps its fingerprint; adding, removing, resizing or touching a file changes it.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.glob(pattern) if p.is_file())
        return _files_fingerprint(files, path.parent if path.is_file() else path)
    if re.search(r"[*?\[{]", str(name_or_path)):
        from .data import expand_shard_pattern  # imports datasets: only for patterns

        files = [Path(file).resolve() for file in expand_shard_pattern(str(path))]
        if files:
            return _files_fingerprint(files, Path(os.path.commonpath([file.parent for file in files])))
    return {"name": str(name_or_path)}


def _files_fingerprint(files: list[Path], root: Path) -> dict:
    digest, total = hashlib.sha256(), 0
    for file in files:
        stat = file.stat()
        total += stat.st_size
        digest.update(f"{file.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"files": len(files), "bytes": total, "sha256": digest.hexdigest()}


def model_fingerprint(name_or_path: str | Path) -> dict:
    """`input_fingerprint` of a model folder's config and weights only: a model card or evaluation results
    written next to them later do not change which model it is."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return input_fingerprint(name_or_path)
    weights = [p for p in path.iterdir() if p.is_file() and re.search(r"(^config\.json|\.safetensors|\.bin)$", p.name)]
    digest = hashlib.sha256()
    for file in sorted(weights):
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"files": len(weights), "bytes": sum(p.stat().st_size for p in weights), "sha256": digest.hexdigest()}


def _describe(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


class TrainingJob:
    """The job a training command runs in `output_dir`: its options and input fingerprints, recorded in
    `output_dir/hf_moe_job.json`.

    Usage, before any output is written:

        job = TrainingJob(output_dir, "train-router", options, inputs={"data": input_fingerprint(data)})
        job.check()              # raises JobMismatchError if output_dir holds a different job
        if job.is_complete(): ...  # a finished job: report it, do not train again
        job.record()             # once the inputs were validated, before training
        ...train, save...
        job.mark_complete()

    `owned_outputs` are the names (globs) of what the job writes into `output_dir`; if some are there but no
    job is recorded, they are another run's (or an older hf-moe's), and the job refuses to continue from them.
    A recorded, unfinished job that made no progress (`progress()`: no complete checkpoint, no whole output file)
    is replaced by a job with other options or inputs, its leftovers (incomplete checkpoints, intermediate
    folders computed from the old inputs) removed; one that made progress is refused, naming how to start over.

    `check()` takes the output folder's lock (main process only), held until `release()`, the end of
    `complete_job`, or the job object's end (garbage collection, interpreter exit).
    """

    def __init__(
        self,
        output_dir: str | Path,
        command: str,
        options: dict,
        inputs: dict | None = None,
        owned_outputs: tuple[str, ...] = ("checkpoint-*",),
    ):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / JOB_FILE
        self.command = command
        self.options = json.loads(json.dumps(options, default=str))
        self.inputs = json.loads(json.dumps(inputs or {}, default=str))
        self.owned_outputs = owned_outputs
        self._replace = False
        self._lock = OutputDirLock(self.output_dir)

    def recorded(self) -> dict | None:
        """The job recorded in `output_dir`, or None."""
        if not self.path.is_file():
            return None
        try:
            recorded = json.loads(self.path.read_text())
            if not isinstance(recorded, dict) or "options" not in recorded:
                raise ValueError("no 'options' entry")
        except ValueError as err:
            raise JobMismatchError(
                f"{self.path} is not a job record hf-moe can read ({err}); use a new --output_dir, or remove "
                f"{self.output_dir} to start over."
            ) from err
        return recorded

    def differences(self, recorded: dict) -> list[str]:
        """One line per option or input that differs from `recorded`."""
        lines = []
        if recorded.get("command", self.command) != self.command:
            lines.append(f"command: {recorded['command']!r} (recorded) vs {self.command!r} (now)")
        old_options = recorded.get("options", {})
        # Only options both sides know: a field added by a newer transformers must not block a resume.
        for key in sorted(old_options.keys() & self.options.keys()):
            if old_options[key] != self.options[key]:
                old, new = _describe(old_options[key]), _describe(self.options[key])
                lines.append(f"--{key}: {old} (recorded) vs {new} (now)")
        old_inputs = recorded.get("inputs", {})
        for key in sorted(old_inputs.keys() | self.inputs.keys()):
            if old_inputs.get(key) != self.inputs.get(key):
                old, new = _describe_input(old_inputs.get(key)), _describe_input(self.inputs.get(key))
                # Same count and size: files were edited or replaced in place (their times changed).
                same = " (files modified or replaced)" if old == new else ""
                lines.append(f"{key}: {old} (recorded) vs {new} (now){same}")
        return lines

    def outputs(self) -> list[Path]:
        """What of `owned_outputs` is in `output_dir` (temporary siblings of atomic writes aside)."""
        found = {p for pattern in self.owned_outputs for p in self.output_dir.glob(pattern)}
        return sorted(p for p in found if not p.name.startswith("."))

    def progress(self) -> list[Path]:
        """The outputs a re-run of this job would continue from: complete Trainer checkpoints (in `output_dir` or
        in an owned folder, as MCL's stage runs), and owned files (written whole, e.g. embedding shards). Folders
        without a complete checkpoint (incomplete checkpoints, features or labels computed from the inputs) are
        not progress: they are quick to recompute, and only valid for the inputs they came from."""
        found = []
        for path in self.outputs():
            if path.is_file():
                found.append(path)
            elif _CHECKPOINT.match(path.name):
                if checkpoint_problem(path) is None:
                    found.append(path)
            elif path.is_dir() and last_complete_checkpoint(path, warn=False):
                found.append(path)
        return found

    def check(self) -> None:
        """Take the output folder's lock (`hf_moe.fileio.OutputFolderLocked` if another run holds it), then refuse
        (`JobMismatchError`) to continue in `output_dir` if it holds a different job that made progress, or
        outputs of a job that was never recorded. A different job that made none is replaced (`start over`)."""
        if _is_main_process():
            # Before the record is read: a run that checked, then lost the folder to another, would mix results.
            self._lock.acquire()
        recorded = self.recorded()
        outputs = [path.name for path in self.outputs()]
        if recorded is None:
            if outputs:
                raise JobMismatchError(
                    f"{self.output_dir} already holds {', '.join(outputs[:5])} but no {JOB_FILE}: they come from a "
                    "different run (or an older hf-moe), which this job cannot safely continue. Use a new "
                    f"--output_dir, or remove them to start over."
                )
            return
        differences = self.differences(recorded)
        if not differences:
            return
        shown = "\n  ".join(differences)
        if not recorded.get("complete"):
            progress = self.progress()
            if not progress:
                self._start_over(outputs, shown)
                return
            done = f"it made progress ({', '.join(p.name for p in progress[-3:])}) but did not finish"
        else:
            done = "it is complete"
        raise JobMismatchError(
            f"{self.output_dir} holds a different {recorded.get('command', 'training')} job (recorded in "
            f"{self.path}; {done}); re-running continues the same job only. Differences:\n  {shown}\nTo continue "
            "that job, re-run it with its recorded options and inputs. To start over with these, remove the "
            f"folder first (`rm -r {self.output_dir}`), or use a new --output_dir."
        )

    def _start_over(self, outputs: list[str], differences: str) -> None:
        """Replace a recorded job that made no progress: what it left came from other options or inputs (a run
        that failed on bad data, before its first complete checkpoint) and must not be read by this one."""
        removed = f"; removing what it left ({', '.join(outputs)})" if outputs else ""
        logger.warning(
            f"Starting over in {self.output_dir}: the job recorded there differs from this one and stopped before "
            f"its first complete checkpoint{removed}. Differences:\n  {differences}"
        )
        if outputs and _is_main_process():
            for name in outputs:
                path = self.output_dir / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        self._replace = True

    def is_complete(self) -> bool:
        recorded = self.recorded()
        return bool(recorded and recorded.get("complete"))

    def record(self) -> None:
        """Write the job record (main process; a no-op if it is already recorded)."""
        if (self.path.is_file() and not self._replace) or not _is_main_process():
            return
        self._write({"command": self.command, "options": self.options, "inputs": self.inputs, "complete": False})

    def mark_complete(self, **details) -> None:
        """Record that the job's final outputs are saved (main process)."""
        if not _is_main_process():
            return
        recorded = self.recorded() or {"command": self.command, "options": self.options, "inputs": self.inputs}
        self._write({**recorded, **details, "complete": True})

    def release(self) -> None:
        """Release the output folder's lock (taken by `check`); a no-op when not held."""
        self._lock.release()

    def _write(self, content: dict) -> None:
        self._lock.acquire()  # a record is never written without the lock (a no-op after `check`)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_output_file(self.path) as tmp:
            tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def _describe_input(fingerprint: dict | None) -> str:
    if not fingerprint:
        return "absent"
    if "files" in fingerprint:
        return f"{fingerprint['files']} files, {fingerprint['bytes']:,} bytes"
    return repr(fingerprint.get("name"))


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
WEIGHTS_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why the Trainer checkpoint folder `checkpoint` cannot be resumed from (None when it is complete).

    Complete means: `trainer_state.json` parses (the Trainer writes it last), the model weights are there and
    whole (safetensors sizes agree with their headers; torch zip archives have their central directory), and
    the optimizer state is there (optimizer.pt, or DeepSpeed's / FSDP's own folders). Only headers are read.
    """
    from .loading import check_safetensors_file

    checkpoint = Path(checkpoint)
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if "global_step" not in state:
            return "trainer_state.json has no global_step"
    except FileNotFoundError:
        return "no trainer_state.json (the save was interrupted)"
    except ValueError as err:
        return f"trainer_state.json is truncated or corrupt ({err})"
    weights = [checkpoint / name for name in WEIGHTS_FILES if (checkpoint / name).is_file()]
    for index in WEIGHTS_INDEXES:
        if (checkpoint / index).is_file():
            try:
                shards = set(json.loads((checkpoint / index).read_text())["weight_map"].values())
            except (ValueError, KeyError) as err:
                return f"{index} is truncated or corrupt ({err})"
            missing = [shard for shard in shards if not (checkpoint / shard).is_file()]
            if missing:
                return f"weight shards {sorted(missing)[:3]} are missing"
            weights += [checkpoint / shard for shard in shards]
    deepspeed = (checkpoint / "latest").is_file()
    if not weights and not deepspeed:
        return "no model weights"
    for file in weights:
        if file.suffix == ".safetensors":
            try:
                check_safetensors_file(file)
            except OSError:
                return f"{file.name} is truncated or corrupt"
        elif not zipfile.is_zipfile(file):
            return f"{file.name} is truncated or corrupt"
    optimizer = checkpoint / "optimizer.pt"
    if optimizer.is_file():
        if not zipfile.is_zipfile(optimizer):
            return "optimizer.pt is truncated or corrupt"
    elif not deepspeed and not any(checkpoint.glob("optimizer_*")):
        return "no optimizer state (optimizer.pt)"
    return None


def last_complete_checkpoint(folder: str | Path, warn: bool = True) -> str | None:
    """The newest Trainer checkpoint in `folder` that is complete (see `checkpoint_problem`), or None.

    Newer incomplete ones (a kill during a checkpoint write) are skipped with a warning; the Trainer overwrites
    them when it reaches their step again.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    checkpoints = sorted(
        (int(match[1]), path) for path in folder.iterdir() if path.is_dir() and (match := _CHECKPOINT.match(path.name))
    )
    for _, checkpoint in reversed(checkpoints):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return str(checkpoint)
        if warn:
            logger.warning(f"Not resuming from the incomplete checkpoint {checkpoint}: {problem}.")
    return None


def job_already_done(job: "TrainingJob", training_args, message: str) -> bool:
    """Check `job` (a differing re-run raises `JobMismatchError`); when it already finished with its model saved,
    log `message`, push its folder if asked, and return True."""
    job.check()
    if not (job.is_complete() and (job.output_dir / "config.json").is_file()):
        return False
    logger.warning(message)
    push_training_output(job.output_dir, training_args)
    job.release()
    return True


class _TrainingAlreadyDone(Exception):
    pass


def _steps_left(checkpoint: str | Path, trainer) -> tuple[int, int]:
    """(global step, max steps) of `checkpoint`: its own record of the run's max steps (epoch-based runs too),
    or the trainer's `--max_steps`."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    max_steps = trainer.args.max_steps if trainer.args.max_steps > 0 else state.get("max_steps", 0)
    return state["global_step"], max_steps


def train_from_last_checkpoint(trainer, folder: str | Path, what: str) -> None:
    """`trainer.train()`, resumed from the last complete checkpoint in `folder` when there is one.

    A checkpoint at the run's last step (the Trainer always saves one there; a kill during the final save leaves
    it) is loaded without training: `Trainer.train` resumed there would run one more optimizer step whenever
    max_steps is not a whole number of epochs (its data skipping lands inside the last epoch).
    """
    last = last_complete_checkpoint(folder)
    if last:
        logger.warning(f"Resuming {what} from {last}")
        step, max_steps = _steps_left(last, trainer)
        if max_steps > 0 and step >= max_steps:
            logger.warning(f"{last} is the last step ({step} of {max_steps}): loading it, with nothing left to train.")
            _load_without_training(trainer, last)
            return
    trainer.train(resume_from_checkpoint=last)


def _load_without_training(trainer, checkpoint: str) -> None:
    """Restore `checkpoint` into `trainer` (its weights, under DeepSpeed / FSDP / PEFT alike, and its state) through
    `Trainer.train`'s own resume path, stopped before its first step."""
    from transformers import TrainerCallback

    class StopBeforeTheFirstStep(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            raise _TrainingAlreadyDone

    stop = StopBeforeTheFirstStep()
    trainer.callback_handler.callbacks.insert(0, stop)  # first: no other callback begins a run that never runs
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except _TrainingAlreadyDone:
        pass
    finally:
        trainer.callback_handler.callbacks.remove(stop)
        trainer.is_in_train = False


def complete_job(trainer, job: "TrainingJob", training_args, write_outputs: Callable[[], None]) -> Path:
    """The end of a training command: the main process writes the outputs (`write_outputs()`) and marks `job`
    complete at the trainer's step; every process waits for that; the output folder is pushed if asked. Returns
    the output folder."""
    from accelerate import PartialState

    if trainer.is_world_process_zero():
        write_outputs()
        job.mark_complete(global_step=trainer.state.global_step)
    PartialState().wait_for_everyone()
    push_training_output(job.output_dir, training_args)
    job.release()
    return job.output_dir


def push_training_output(folder: str | Path, training_args) -> str | None:
    """The training commands' `--push_to_hub` (TrainingArguments' flags): upload the final model in `folder` to
    `--hub_model_id` (default: the output folder's name) from the main process only, leaving out what the run keeps
    beside the model (its checkpoints, job record and logs). Returns the repo URL, or None when not pushing."""
    from accelerate import PartialState

    from .hub import push_to_hub

    if not training_args.push_to_hub or not PartialState().is_main_process:
        return None
    return push_to_hub(
        folder,
        training_args.hub_model_id or Path(training_args.output_dir).name,
        token=training_args.hub_token,
        private=training_args.hub_private_repo,
        ignore_patterns=["checkpoint-*", JOB_FILE, "runs/*"],
    )


def share_process_group_with_deepspeed() -> None:
    """Let DeepSpeed's communication layer use the process group `TrainingArguments` set up; call it from a
    `TrainingArguments` subclass's `__post_init__` when `deepspeed` is set (ZeRO-3 on CPU needs it).

    With `use_cpu` the arguments start torch.distributed (gloo) without DeepSpeed's layer; `from_pretrained` then
    builds the model under ZeRO-3's `zero.Init`, which reads the world size from that layer, finds it uninitialised,
    assumes one process and fails its batch-size check. DeepSpeed adopts an initialised group as it is.
    """
    if not torch.distributed.is_initialized():
        return
    from deepspeed import comm

    if not comm.is_initialized():
        comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def freeze_all_but(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Make exactly the parameters whose name matches one of `patterns` trainable; return their names."""
    regexes = [re.compile(pattern) for pattern in patterns]
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(regex.search(name) for regex in regexes))
        if parameter.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"No parameter name matches trainable_parameters={patterns}.")
    return trainable


# ----------------------------------------------------------------------------------------------------------------
# Loss scaling under gradient accumulation and several processes
# ----------------------------------------------------------------------------------------------------------------
#
# What transformers' Trainer does with the loss `compute_loss` returns (training_step / compute_loss, transformers 5):
# - it divides the loss by `current_gradient_accumulation_steps` (the micro-batches of this optimizer step, fewer in
#   an epoch's last step) UNLESS the loss counts as already scaled: `loss_is_scaled_for_ga` when a subclass sets it,
#   else when the model accepts loss kwargs and `num_items_in_batch` (the label tokens of all micro-batches of the
#   step, summed over processes when `average_tokens_across_devices`) was passed, or a `compute_loss_func` is set;
# - its own `compute_loss` multiplies a loss normalised by that global `num_items_in_batch` by the number of
#   processes, because DDP (and DeepSpeed, and FSDP) AVERAGE the gradients over processes;
# - accelerate's `backward` divides by its own accumulation steps, which the Trainer sets to 1, and under DeepSpeed the
#   Trainer passes `scale_wrt_gas=False`, so DeepSpeed's engine does not divide by its `gradient_accumulation_steps`
#   either: the Trainer's division above is the only one, under DDP and ZeRO-1/2/3 alike.
# A loss term averaged per micro-batch (a mean over its samples or tokens, a balance loss of its tokens) therefore has
# its coefficient as effective weight (mean over micro-batches and processes) when multiplied by
# `per_micro_batch_scale`, and a term normalised by `num_items_in_batch` is a per-token mean of the whole accumulated
# all-process batch when multiplied by `per_token_scale`. A subclass overriding `compute_loss` must apply both itself.


def trainer_divides_loss(trainer, num_items_in_batch) -> bool:
    """Whether `trainer.training_step` divides the loss `compute_loss` returns by the accumulation steps."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            getattr(trainer, "compute_loss_func", None) is not None
        )
    return not scaled


def per_micro_batch_scale(trainer, num_items_in_batch, training: bool = True) -> float:
    """The factor of a loss term averaged per micro-batch (and per process) in the loss `compute_loss` returns, so that
    its effective weight is its coefficient whatever the accumulation steps and number of processes: 1 when the
    Trainer divides the loss by the accumulation steps itself, else 1 / accumulation steps (1 outside training)."""
    if not training or trainer_divides_loss(trainer, num_items_in_batch):
        return 1.0
    return 1.0 / getattr(trainer, "current_gradient_accumulation_steps", 1)


def per_token_scale(trainer, num_items_in_batch) -> float:
    """The factor of a loss term normalised by `num_items_in_batch` (a sum over the label tokens of this micro-batch
    divided by the label tokens of the whole accumulated batch) in the loss `compute_loss` returns, as the Trainer's
    own `compute_loss` applies it: the number of processes when `num_items_in_batch` was summed over them (the
    gradient average over processes then gives the per-token mean of the all-process batch), else 1. A term that is a
    per-micro-batch mean instead (no `num_items_in_batch`) takes `per_micro_batch_scale`."""
    if num_items_in_batch is None:
        return per_micro_batch_scale(trainer, num_items_in_batch)
    args = trainer.args
    accepts = trainer.model_accepts_loss_kwargs or getattr(trainer, "compute_loss_func", None) is not None
    if not (getattr(args, "average_tokens_across_devices", False) and accepts):
        return 1.0
    if args.n_gpu > 1:
        return float(args.n_gpu)
    tp_size = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
    return float(trainer.accelerator.num_processes // tp_size)


__all__ = [
    "JOB_FILE",
    "JobMismatchError",
    "TrainingJob",
    "checkpoint_problem",
    "freeze_all_but",
    "input_fingerprint",
    "last_complete_checkpoint",
    "local_path",
    "model_fingerprint",
    "result_options",
    "share_process_group_with_deepspeed",
    "complete_job",
    "job_already_done",
    "train_from_last_checkpoint",
    "per_micro_batch_scale",
    "per_token_scale",
    "trainer_divides_loss",
]


class RecordedMetricsMixin:
    """For `Trainer` subclasses: values recorded in `compute_loss` (scalars or tensors, e.g. expert loads) are summed
    on the device, and their means reach the host in ONE transfer per training log (averaged over processes), never
    through a host synchronisation per step. `_logged_metrics` turns the means into log entries (scalars as they
    are by default); `log` adds them to the Trainer's training-loss logs."""

    def _record(self, name: str, value: torch.Tensor | None, weight: torch.Tensor | float = 1.0) -> None:
        """Add `value` (weighted: a weight of 0 adds nothing) to the running sum of `name`."""
        if value is None:
            return
        value = value.detach().float()  # out of place: the backward pass still needs the original
        sums = self.__dict__.setdefault("_recorded", {})
        total, count = sums.get(name, (0.0, 0.0))
        sums[name] = (total + value * weight, count + weight)

    def _pop_recorded(self) -> dict[str, tuple]:
        """{name: (mean since the last call: a float or nested lists, total weight seen)}, emptying the sums."""
        recorded, self._recorded = self.__dict__.get("_recorded", {}), {}
        if not recorded:
            return {}
        parts, shapes = [], []
        for total, count in recorded.values():
            total = torch.as_tensor(total, dtype=torch.float32, device=self.args.device)
            count = torch.as_tensor(count, dtype=torch.float32, device=self.args.device)
            parts += [(total / count.clamp(min=1)).flatten(), count.reshape(1)]
            shapes.append(total.shape)
        packed = torch.cat(parts)
        if self.args.world_size > 1:
            packed = self.accelerator.reduce(packed, reduction="mean")
        values, offset, means = packed.tolist(), 0, {}  # the one host synchronisation per log
        for name, shape in zip(recorded, shapes):
            size = math.prod(shape)
            mean = torch.tensor(values[offset : offset + size]).reshape(shape).tolist()
            means[name] = (mean, values[offset + size])
            offset += size + 1
        return means

    def _logged_metrics(self) -> dict[str, float]:
        return {name: mean for name, (mean, _) in self._pop_recorded().items()}

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # Training-loss logs (at logging_steps) carry the means of what compute_loss recorded since the last one.
        if "loss" in logs and self.__dict__.get("_recorded"):
            for name, value in self._logged_metrics().items():
                if not math.isnan(value):
                    logs[name] = round(value, 6)
        super().log(logs, *args, **kwargs)
