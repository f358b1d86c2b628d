"""`save_model`, `push_to_hub` and `create_model_card` of `ContinualTrainer`, and what its model card says.

A continual run's unit is the finished task: ``output_dir/task-{i}/`` holds the model, processor,
method state (feature bank), ``continual_state.json`` and the card. The standard `Trainer` calls
therefore act on the latest finished task:

- ``trainer.save_model(folder)`` writes that task's checkpoint into `folder` (default
  ``output_dir``), which `ContinualCLIP.from_pretrained` / `ContinualTrainer.from_pretrained` load;
  before any task finished it writes the model and processor alone;
- ``trainer.push_to_hub()`` pushes that folder to branch ``task-{i}`` of ``hub_model_id`` and makes
  ``main`` follow it (`hf_pmi.hub.push_task_checkpoint`), raising on failure;
- ``trainer.create_model_card(...)`` renders the hf_pmi card of that task (Trainer's arguments
  `license`, `tags`, `model_name`, `finetuned_from`, `dataset` override what the run knows) into
  ``output_dir/README.md``.

The `Trainer`'s own mid-task checkpoints (``save_strategy``) are refused before any work
(`hf_pmi.validation.check_task_loop_arguments`): they would be pickles that resume never reads.

`card_state` gathers the card's facts from the trainer: real class order, the Hub dataset id (a
local folder loaded with a packaged builder such as ``imagefolder`` has none), base model and its
relation (LoRA adapter or fine-tune), hyper-parameters and framework versions.
"""

from __future__ import annotations

import os
import shutil

from .checkpoint import ContinualResult, latest_task_checkpoint, read_state
from .hub import check_hub_access, push_task_checkpoint
from .log import get_logger
from .model_card import card_tags, write_model_card
from .resolve import hub_model_license

logger = get_logger()

#: Training arguments shown in the card's hyper-parameter table (when they apply).
CARD_HYPERPARAMETERS = (
    "method", "learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
)
_FRAMEWORKS = ("hf_pmi", "torch", "transformers", "peft", "datasets", "accelerate", "huggingface_hub")


def packaged_builders() -> set[str]:
    """Names of `datasets`' packaged builders (imagefolder, csv, parquet, ...): not dataset ids."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        return set(_PACKAGED_DATASETS_MODULES)
    except ImportError:  # pragma: no cover - private name moved
        return {"imagefolder", "audiofolder", "videofolder", "csv", "json", "parquet", "arrow", "text", "webdataset"}


def dataset_id(tasks) -> str | None:
    """The Hub dataset id of the tasks' data, or None (a local folder, a generated dataset)."""
    name = (tasks.metadata or {}).get("dataset")
    if not name or name in packaged_builders():
        return None
    return name


def framework_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in _FRAMEWORKS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _hyperparameters(args, method_settings: dict | None) -> dict:
    """The card's hyper-parameter table: the training arguments, then the method's own settings."""
    values = {k: getattr(args, k) for k in CARD_HYPERPARAMETERS if hasattr(args, k)}
    if values.get("max_steps", -1) > 0:
        values.pop("num_train_epochs", None)  # max_steps wins in the Trainer
    else:
        values.pop("max_steps", None)
    values["num_processes"] = args.world_size
    values.update(method_settings or {})
    return values


def card_state(trainer, g: int, result, folder: str) -> dict:
    """The `hf_pmi.model_card` state of global task `g` (see the table in that module)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    info = trainer.method.card_info()
    base_model = model.base_model_id  # a Hub id or None: a local path means nothing to the card's readers
    base_license = hub_model_license(base_model, trainer.args.hub_token)
    lora = model.lora_config
    tasks = trainer.tasks
    dataset = dataset_id(tasks)
    grid = os.path.join(folder, "replay_samples.png")
    return {
        "accuracy_matrix": result.accuracy_matrix,
        "num_tasks": trainer.num_total_tasks,
        "task_id": g,
        "base_model": base_model,
        "base_in_checkpoint": bool(lora) and base_model is None,  # ContinualCLIP.save_pretrained writes base/
        "base_model_relation": "adapter" if lora else "finetune",
        "license": base_license,
        "license_source": "the base model's" if base_license else None,
        "templates": model.templates,
        "data_free": trainer.method.data_free,
        "has_feature_bank": os.path.isdir(os.path.join(folder, "feature_bank")),
        "lora": {k: lora.get(k) for k in ("r", "lora_alpha", "target_modules", "modules_to_save")} if lora else None,
        "dataset": dataset,
        "method": {"name": trainer.args.method, "description": (type(trainer.method).__doc__ or "").strip()},
        "head": model.head_name,
        # original label ids in learning order; a continued run's earlier classes come from another dataset
        "class_order": tasks.class_order if tasks.task_offset == 0 else None,
        "class_names": model.class_names,
        "task_classes": trainer._task_classes(g),
        "a_last": result.a_last,
        "a_avg": result.a_avg,
        "forgetting": result.forgetting,
        "bwt": result.bwt,
        "unevaluated_tasks": result.unevaluated_tasks,  # a continued checkpoint's earlier tasks: A_last says so
        "seen_accuracy": result.all_seen_accuracy,
        "old_accuracy": result.old_class_accuracy[-1],
        "new_accuracy": result.new_class_accuracy[-1],
        "inversion": info.get("inversion"),
        "repo_id": trainer.hub_model_id,
        "replay_grid": "replay_samples.png" if os.path.exists(grid) else None,
        "replay_grid_caption": (
            "Synthetic samples used to rehearse the old classes (the first ones of the replay buffer, row by row), "
            "each titled with its class."
        ),
        "names_only_classes": [model.class_names[c] for c in info.get("names_only_classes", [])],
        "routed_classes": [model.class_names[c] for c in model.routed_classes],
        "hyperparameters": _hyperparameters(trainer.args, info.get("settings")),
        "framework_versions": framework_versions(),
        "tags": card_tags(trainer.args.method, trainer.method.data_free, bool(info.get("inversion")), bool(lora)),
    }


def continued_args(args, state: dict, source: str):
    """`args` for continuing a checkpoint whose ``continual_state.json`` is `state`.

    Without an explicit ``method`` the checkpoint's own method is kept (a copy of `args` is returned);
    a different method named by the user is used, with a warning.
    """
    import copy

    previous = state.get("method")
    if previous is None or previous == args.method:
        pass
    elif not getattr(args, "method_given", True):
        args = copy.copy(args)
        args.method = previous
        logger.info("Continuing %s with its method %r (set `method` to use another).", source, previous)
    else:
        logger.warning(
            "%s was trained with method %r; continuing with %r as asked. Old classes are then rehearsed the %r "
            "way from task %d on.", source, previous, args.method, args.method, state["task_id"] + 1,
        )
    logger.info("Continuing after task %d of %s: the next task is task-%d.", state["task_id"], source,
                state["task_id"] + 1)
    return args


class ContinualHubMixin:
    """The `Trainer` entry points that save, push and describe a model, for continual runs (module docstring)."""

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Called by `Trainer.__init__` when ``push_to_hub``: fail now, not after hours of training."""
        if not self.args.hub_model_id:
            raise ValueError("push_to_hub=True needs hub_model_id='namespace/name' (the repo that gets a branch per task).")
        check_hub_access(self.args.hub_model_id, token=token or self.args.hub_token,
                         private=private if private is not None else self.args.hub_private_repo)
        self.hub_model_id = self.args.hub_model_id

    def _wait_for_pushes(self) -> None:
        for future in self._pushes:
            result = future.result()
            if not result:
                logger.error("Push of %s failed; push it again with: %s", result.folder, result.retry_command)
                self.failed_pushes.append(result)
        self._pushes = []

    def _latest_task_folder(self, what: str) -> str:
        folder = latest_task_checkpoint(self.args.output_dir)
        if folder is None:
            raise ValueError(
                f"No finished task under {self.args.output_dir}: {what} acts on the latest finished task's "
                f"checkpoint. Call `trainer.train()` first (each task writes output_dir/task-<i>/)."
            )
        return folder

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the latest finished task's checkpoint into `output_dir` (default: ``args.output_dir``).

        The folder then loads with `ContinualCLIP.from_pretrained` and `ContinualTrainer.from_pretrained`.
        Before any task finished, the model and processor alone are written.
        """
        if _internal_call:  # the Trainer's own mid-task checkpoints
            return super().save_model(output_dir, _internal_call=True)
        output_dir = output_dir or self.args.output_dir
        if self.is_world_process_zero():
            latest = latest_task_checkpoint(self.args.output_dir)
            os.makedirs(output_dir, exist_ok=True)
            if latest is None:
                self.family.save_untrained(self, output_dir)
            elif os.path.abspath(latest) != os.path.abspath(output_dir):
                shutil.copytree(latest, output_dir, dirs_exist_ok=True)
            logger.info("Saved %s to %s", latest or "the model", output_dir)
        self.accelerator.wait_for_everyone()

    def push_to_hub(self, commit_message: str | None = None, blocking: bool = True, token: str | None = None,
                    revision: str | None = None, private: bool | None = None, **kwargs):
        """Push the latest finished task to branch ``task-<i>`` of ``hub_model_id`` and make ``main`` follow it.

        Returns the `hf_pmi.hub.PushResult` (a `Future` of it with ``blocking=False``); a failed blocking
        push raises `RuntimeError` with the command that retries it.
        """
        if revision is not None:
            raise ValueError(
                "A continual checkpoint goes to branch task-<i> (and main): pass no revision. To upload a model "
                "to a branch of your choice use `trainer.model.push_to_hub(repo_id, revision=...)`."
            )
        repo_id = self.args.hub_model_id
        if not repo_id:
            raise ValueError("push_to_hub needs hub_model_id='namespace/name' in the ContinualConfig.")
        folder = self._latest_task_folder("push_to_hub")
        if not self.is_world_process_zero():
            return None
        token = token or self.args.hub_token
        check_hub_access(repo_id, token=token, private=private if private is not None else self.args.hub_private_repo)
        task_id = read_state(folder)["task_id"]
        result = push_task_checkpoint(folder, repo_id, task_id, token=token, run_as_future=not blocking)
        if blocking and not result:
            raise RuntimeError(f"Push of {folder} failed: {result.error}. Retry with: {result.retry_command}")
        return result

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs) -> str:
        """Render the hf_pmi card of the latest finished task into ``output_dir/README.md`` (returns its path).

        `license`, `tags` (added), `model_name`, `finetuned_from` (the base model) and `dataset` (a Hub id)
        override what the run recorded; `language`, `tasks`, `dataset_tags` and `dataset_args` do not apply.
        """
        folder = self._latest_task_folder("create_model_card")
        return self.family.render_card(self, folder, license=license, tags=tags, model_name=model_name,
                                       finetuned_from=finetuned_from, dataset=dataset)

    def _render_clip_card(self, folder: str, license=None, tags=None, model_name=None, finetuned_from=None,
                          dataset=None) -> str:
        saved = read_state(folder)
        result = ContinualResult.from_state(saved)
        state = card_state(self, saved["task_id"], result, folder)
        if license:
            state["license"], state["license_source"] = license, None
        if tags:
            state["tags"] = state["tags"] + ([tags] if isinstance(tags, str) else list(tags))
        if model_name:
            state["model_name"] = model_name
        if finetuned_from:
            state["base_model"] = finetuned_from
        if dataset:
            state["dataset"] = dataset if isinstance(dataset, str) else list(dataset)[0]
        if not self.is_world_process_zero():
            return os.path.join(self.args.output_dir, "README.md")
        if state["replay_grid"]:
            shutil.copy(os.path.join(folder, state["replay_grid"]), self.args.output_dir)
        return write_model_card(self.args.output_dir, state)
