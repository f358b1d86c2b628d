"""The BatchNorm family of `ContinualTrainer` (`hf_pmi.families`): the trainer's settings, tasks and callbacks
turned into one run of the BN family's loop (`hf_pmi.resnet.continual.learn_tasks`), whose every phase is one
``transformers.Trainer.train()`` (`hf_pmi.resnet.loop`).

The BN family trains on its own schedule (the reference's: SGD in stages per task, then the head fine-tuned on
real plus replayed samples), so its epochs, stage lrs and replay settings come from `ResNetContinualConfig`,
given to the trainer as ``method_config``. `ContinualConfig` supplies what every run has: the method, the seed,
``output_dir``, resume / overwrite, the Hub settings, callbacks and trackers, and what Trainer's loop does with
every step: ``report_to`` / ``logging_steps`` (step losses), progress bars (``disable_tqdm``),
``gradient_accumulation_steps``, ``max_grad_norm`` (Trainer's default clips at 1.0; the reference never clips:
pass ``max_grad_norm=0`` for its numbers, as the recipes do), mixed precision and several processes (each
takes ``per_device_train_batch_size`` images per step). Trainer's names ``learning_rate``,
``per_device_train_batch_size`` and ``weight_decay`` set the loop's ``lr`` (the first task's), ``batch_size`` and
``weight_decay`` (a different value in both places is refused). Fields the schedule replaces
(``num_train_epochs``, ``max_steps``, ``lr_scheduler_type``, ``warmup_steps``) are refused, naming the
`ResNetContinualConfig` field that takes their role.

Images are decoded once (`tensor_tasks`): resized to the model's square input size and normalised
with the processor's mean and std (default: ImageNet's). Each task folder holds a `ViTImageProcessorPil`
that does exactly that, so ``pipeline("image-classification", model=folder)`` predicts as the run
evaluated.

Example:
    >>> from datasets import ClassLabel, Dataset, DatasetDict, Features, Image as ImageFeature
    >>> from PIL import Image
    >>> from hf_pmi import ContinualConfig, ContinualTrainer, split_class_incremental
    >>> from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    >>> from hf_pmi.resnet.continual import ResNetContinualConfig
    >>> colours = [(220, 30, 30), (30, 200, 40), (40, 50, 230), (230, 220, 20)]
    >>> def split(n):
    ...     features = Features({"image": ImageFeature(), "label": ClassLabel(names=["red", "green", "blue", "yellow"])})
    ...     return Dataset.from_dict({"image": [Image.new("RGB", (8, 8), c) for c in colours for _ in range(n)],
    ...                               "label": [k for k in range(4) for _ in range(n)]}, features=features)
    >>> tasks = split_class_incremental(DatasetDict(train=split(8), test=split(2)), num_tasks=2)
    >>> model = ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=0, image_size=8))
    >>> args = ContinualConfig(output_dir="/tmp/doc_bn_run", method="finetune", overwrite_output_dir=True,
    ...                        disable_tqdm=True, max_grad_norm=0.0)
    >>> trainer = ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=None,
    ...                            method_config=ResNetContinualConfig(epochs=6, later_epochs=4, batch_size=8))
    >>> result = trainer.train()  # doctest: +ELLIPSIS
    {...}
    [hf_pmi] task 0/1 (2 classes seen): ...
    {...}
    [hf_pmi] task 1/1 (4 classes seen): ...
    >>> len(result.accuracy_matrix), model.config.num_labels, sorted(model.config.label2id)
    (2, 4, ['blue', 'green', 'red', 'yellow'])
"""

from __future__ import annotations

import dataclasses
import os
import time

from ..checkpoint import RESULTS_NAME, ContinualResult, latest_task_checkpoint, write_json
from ..metrics import continual_metrics
from ..resume import prepare_output_dir, resume_request
from ..tracking import summary_line, task_metrics
from .continual import INVERTING, METHODS, ResNetContinualConfig, learn_tasks
from .heads import require_batchnorm, require_image_classifier

# ContinualConfig fields the BN loop takes from its ResNetContinualConfig instead (the reference's stages)
SCHEDULE_FIELDS = {"num_train_epochs": "epochs / later_epochs", "max_steps": "epochs / later_epochs",
                   "lr_scheduler_type": "schedule / stage_lrs", "warmup_steps": "(the reference has none)"}
# ContinualConfig fields that set a ResNetContinualConfig field (Trainer's names on the command line)
SHARED_FIELDS = {"learning_rate": "lr", "per_device_train_batch_size": "batch_size", "weight_decay": "weight_decay"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # transformers' IMAGENET_DEFAULT_*


def bn_config(args, method_config: ResNetContinualConfig | None) -> ResNetContinualConfig:
    """The loop's settings: `method_config` with the method and seed of `args` (a clash is an error)."""
    if args.method not in METHODS:
        raise ValueError(f"Method {args.method!r} is not one of the BatchNorm family's {METHODS} (it is a CLIP method). "
                         f"Pick one of those with --method.")
    config = method_config if method_config is not None else ResNetContinualConfig()
    if not isinstance(config, ResNetContinualConfig):
        raise TypeError(f"A BatchNorm classifier takes method_config=ResNetContinualConfig(...) (its schedule, replay and "
                        f"inversion settings), got {type(config).__name__}.")
    defaults = {f.name: f.default for f in dataclasses.fields(type(args))}
    moved = {name: where for name, where in SCHEDULE_FIELDS.items() if getattr(args, name) != defaults[name]}
    if moved:
        raise ValueError(f"A BatchNorm classifier trains on its own schedule (the reference's SGD stages, then head fine-tuning), so "
                         f"{sorted(moved)} set on ContinualConfig would be ignored. Set them on "
                         f"method_config=ResNetContinualConfig(...) instead: {moved}.")
    shared = {}
    for name, own_name in SHARED_FIELDS.items():  # honoured: they set the loop's own field
        value, own = getattr(args, name), getattr(config, own_name)
        if value == defaults[name]:
            continue
        if own not in (ResNetContinualConfig.__dataclass_fields__[own_name].default, value):
            raise ValueError(f"args.{name}={value!r} but method_config.{own_name}={own!r}: set it in one place "
                             f"(--{name} sets ResNetContinualConfig.{own_name}).")
        shared[own_name] = value
    for name in ("method", "seed"):  # the run's values come from args; an explicit other value is a mistake
        own, default = getattr(config, name), ResNetContinualConfig.__dataclass_fields__[name].default
        if own not in (default, getattr(args, name)):
            raise ValueError(f"method_config.{name}={own!r} but args.{name}={getattr(args, name)!r}: the run's {name} "
                             f"comes from ContinualConfig; drop it from ResNetContinualConfig.")
    return dataclasses.replace(config, method=args.method, seed=args.seed, progress=False, **shared)


def task_processor(model, processing_class):
    """The `ViTImageProcessorPil` that resizes and normalises as the run's `tensor_tasks` do (PIL, bilinear)."""
    from transformers import ViTImageProcessorPil
    from transformers.image_utils import PILImageResampling

    size = getattr(model.config, "image_size", None)
    if size is None and processing_class is not None:
        for what in ("crop_size", "size"):  # the size the model sees: after the crop, if there is one
            value = getattr(processing_class, what, None)  # a dict, or transformers v5's SizeDict
            for key in ("height", "shortest_edge"):
                size = size or (value.get(key) if isinstance(value, dict) else getattr(value, key, None))
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"Cannot tell the input size of {type(model).__name__}: its config has no image_size and no "
                         "image processor was given. Pass processing_class=AutoImageProcessor.from_pretrained(<model id>) "
                         "or an image processor whose size is the model's input size.")
    mean = getattr(processing_class, "image_mean", None) or IMAGENET_MEAN
    std = getattr(processing_class, "image_std", None) or IMAGENET_STD
    return ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=list(mean), image_std=list(std),
                             resample=PILImageResampling.BILINEAR)


class BNRun:
    """One `learn_tasks` run for a `ContinualTrainer` given a BatchNorm image classifier (see the module docstring).

    Every check runs here, before any data is decoded. `notify(event, task_id, **kw)` fires the trainer's
    ``on_task_begin`` / ``on_task_end`` callbacks; `log(metrics)` reaches its trackers.
    """

    def __init__(self, trainer, model, tasks, processing_class, method_config):
        require_image_classifier(model)
        args = trainer.args
        self.trainer, self.model, self.tasks, self.args = trainer, model, tasks, args
        self.config = bn_config(args, method_config)  # the head was checked by the trainer (it can grow)
        if self.config.method in INVERTING:
            require_batchnorm(model, self.config.method)
        self.processor = task_processor(model, processing_class)
        self.start_from: str | None = None  # a finished task folder this run continues (ContinualTrainer.from_pretrained)

    def train(self, resume_from_checkpoint, notify) -> ContinualResult:
        from ..lock import RunLock
        from .data import tensor_tasks

        args = self.args
        resume = resume_request(args.resume_from_checkpoint if resume_from_checkpoint is None else resume_from_checkpoint)

        def prepare():  # another run writing there: refused before anything is removed
            RunLock(args.output_dir).check()
            prepare_output_dir(args.output_dir, resume, args.overwrite_output_dir)

        self.trainer._on_main_process(prepare)  # one process removes or keeps; the others wait for it
        self.trainer.accelerator.wait_for_everyone()
        latest = latest_task_checkpoint(args.output_dir)
        if isinstance(resume, str) and (latest is None or os.path.abspath(resume) != os.path.abspath(latest)):
            raise ValueError(f"A BatchNorm run resumes after its latest finished task ({latest}), not from {resume}: pass "
                             "resume_from_checkpoint=True.")
        size = self.processor.size["height"]
        tensors = tensor_tasks(self.tasks, size, self.processor.image_mean, self.processor.image_std,
                               progress=not args.disable_tqdm)
        self._wall, self._notify = time.time(), notify
        out = learn_tasks(self.model, tensors, self.config, output_dir=args.output_dir,
                          hub_model_id=args.hub_model_id if args.push_to_hub else None, hub_token=args.hub_token,
                          start_from=self.start_from, processor=self.processor, events=self._event,
                          args=args, callback_handler=self.trainer.callback_handler)
        self.inversion = {k: out[k] for k in ("inversion_seconds", "inversion_passes", "inverted_classes")}
        self.trainer.failed_pushes = [push for push in out["pushes"] if not push["ok"]]  # the CLI exits 1 on them
        return self._result(out["accuracy_matrix"], out["counts"], out["task_seconds"], out["losses"])

    def _result(self, matrix, counts, task_seconds, losses) -> ContinualResult:
        return ContinualResult(method=self.config.method, seed=self.config.seed, class_order=self.tasks.class_order,
                               class_names=self.tasks.class_names, accuracy_matrix=matrix, counts=counts,
                               wall_seconds=time.time() - self._wall, task_seconds=list(task_seconds),
                               method_logs=list(losses), **continual_metrics(matrix, counts))

    def _event(self, name: str, g: int, info: dict) -> None:
        if name == "on_task_begin":
            self._notify(name, g)
            return
        result = self._result(info["accuracy_matrix"], info["counts"], info["task_seconds"], info["losses"])
        metrics = task_metrics(result, g, self.model.config.num_labels)
        self.trainer.log(dict(metrics))
        self.trainer.callback_handler.end_task(0)
        if self.trainer.is_world_process_zero():
            write_json(os.path.join(self.args.output_dir, RESULTS_NAME), result.to_dict())
            self.trainer.save_metrics("eval", metrics)
            print(f"[hf_pmi] {summary_line(metrics, self.tasks.task_offset + len(self.tasks))}", flush=True)
        self._notify(name, g, result=result)


def setup_batchnorm(trainer, model, args, tasks, processing_class, method_config, **kwargs) -> None:
    """The BN family's `ContinualTrainer` setup (`hf_pmi.families`): the Trainer around the model, then `BNRun`."""
    from ..tracking import ContinualCallbackHandler
    from ..log import set_verbosity
    from ..validation import check_output_dir_writable
    from .continual import own_classes

    own = own_classes(model)
    check_output_dir_writable(args.output_dir)
    if tasks[0].class_ids[0] != own:  # the new classes follow the model's own
        tasks = tasks.continuing(own, tasks.task_offset)
    trainer.init_trainer(model=model, args=args, processing_class=processing_class, **kwargs)
    set_verbosity(args.get_process_log_level())
    trainer.callback_handler = ContinualCallbackHandler.from_handler(trainer.callback_handler)
    trainer.tasks = tasks
    trainer.family_run = BNRun(trainer, trainer.model, tasks, processing_class, method_config)


def continue_batchnorm(cls, folder, state, source, tasks, args, processing_class=None, method_config=None, **kwargs):
    """`ContinualTrainer.from_pretrained` for a BN-family task folder: its model, processor and settings; the run
    loads its replay pool and bank (`hf_pmi.resnet.continual.learn_tasks`, ``start_from``)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from ..data import ContinualTasks
    from ..integrity import verify_checksums
    from ..trainer_hub import continued_args
    from ..validation import check_same_processor, refuse_known_classes

    if not isinstance(tasks, ContinualTasks):
        raise ValueError("Learning classes from their names only needs a CLIP checkpoint; a BatchNorm classifier "
                         "learns new classes from images: pass tasks from `split_class_incremental(...)`.")
    verify_checksums(folder, state.get("checksums"))  # before anything is built from it (the run loads the pool)
    model = AutoModelForImageClassification.from_pretrained(folder)
    refuse_known_classes(model.config.id2label.values(), tasks, source)
    check_same_processor(folder, processing_class, source)
    if processing_class is None and os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        processing_class = AutoImageProcessor.from_pretrained(folder)
    args = continued_args(args, state, source)
    if method_config is None:  # the continued run's own settings, with this run's method and seed
        method_config = dataclasses.replace(ResNetContinualConfig.from_dict(state["settings"]["config"]),
                                            method=args.method, seed=args.seed)
    trainer = cls(model=model, args=args, tasks=tasks.continuing(model.config.num_labels, state["task_id"] + 1),
                  processing_class=processing_class, method_config=method_config, **kwargs)
    trainer.family_run.start_from = folder
    return trainer
