"""`ContinualTrainer` on an image classifier with BatchNorm: the trainer's settings, tasks and callbacks
turned into one run of the BN family's loop (`hf_pmi.resnet.continual.learn_tasks`).

The BN family trains with its own schedule (the reference's: SGD in stages per task, then the head
fine-tuned on real plus replayed samples), so its numbers come from `ResNetContinualConfig`,
given to the trainer as ``method_config``. `ContinualConfig` supplies what every run has: the method,
the seed, ``output_dir``, resume / overwrite, the Hub settings, callbacks and trackers. A training
number set on `ContinualConfig` that this loop would ignore (``learning_rate``, ``num_train_epochs``,
...) is refused, naming the `ResNetContinualConfig` field that takes it; so are
``gradient_accumulation_steps`` and ``max_grad_norm`` (this loop steps once per batch and never clips).

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
    >>> args = ContinualConfig(output_dir="/tmp/doc_bn_run", method="finetune", overwrite_output_dir=True, disable_tqdm=True)
    >>> trainer = ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=None,
    ...                            method_config=ResNetContinualConfig(epochs=6, later_epochs=4, batch_size=8))
    >>> result = trainer.train()  # doctest: +ELLIPSIS
    {'eval_task': 0, ...}
    [hf_pmi] task 0/1 (2 classes seen): ...
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

# ContinualConfig fields this loop does not read, and the ResNetContinualConfig field that takes their role
SCHEDULE_FIELDS = {"learning_rate": "lr", "num_train_epochs": "epochs / later_epochs",
                   "per_device_train_batch_size": "batch_size", "weight_decay": "weight_decay",
                   "max_steps": "epochs / later_epochs", "lr_scheduler_type": "schedule / stage_lrs",
                   "warmup_steps": "(the reference has none)"}
# ContinualConfig fields the BN loop cannot honour yet (issue 30, part 2 moves it into Trainer's loop)
UNSUPPORTED_FIELDS = {
    "gradient_accumulation_steps": "the BN loop steps once per batch; raise ResNetContinualConfig.batch_size instead",
    "max_grad_norm": "the reference's loop does not clip gradients; leave it at its default",
}
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
    unsupported = {name: why for name, why in UNSUPPORTED_FIELDS.items() if getattr(args, name) != defaults[name]}
    if unsupported:
        raise ValueError(f"A BatchNorm classifier's loop ignores {sorted(unsupported)} set on ContinualConfig: "
                         + "; ".join(f"{k}: {v}" for k, v in unsupported.items()) + ".")
    for name in ("method", "seed"):  # the run's values come from args; an explicit other value is a mistake
        own, default = getattr(config, name), ResNetContinualConfig.__dataclass_fields__[name].default
        if own not in (default, getattr(args, name)):
            raise ValueError(f"method_config.{name}={own!r} but args.{name}={getattr(args, name)!r}: the run's {name} "
                             f"comes from ContinualConfig; drop it from ResNetContinualConfig.")
    return dataclasses.replace(config, method=args.method, seed=args.seed, progress=False)


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
        if trainer.accelerator.num_processes > 1:
            raise ValueError("The BatchNorm family's loop runs in one process: launch with `accelerate launch "
                             "--num_processes 1` (or plain python).")
        self.processor = task_processor(model, processing_class)
        self.start_from: str | None = None  # a finished task folder this run continues (ContinualTrainer.from_pretrained)

    def train(self, resume_from_checkpoint, notify) -> ContinualResult:
        from ..lock import RunLock
        from .data import tensor_tasks

        args = self.args
        resume = resume_request(args.resume_from_checkpoint if resume_from_checkpoint is None else resume_from_checkpoint)
        RunLock(args.output_dir).check()  # another run writing there: refused before anything is removed
        prepare_output_dir(args.output_dir, resume, args.overwrite_output_dir)
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
                          start_from=self.start_from, processor=self.processor, events=self._event)
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
