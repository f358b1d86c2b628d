"""What the ResNet recipes (``recipes/resnet32_cifar100.py``, ``recipes/resnet_tiny_imagenet.py``) share:
their flags, and one `ContinualTrainer` run on a ResNet-32 from scratch.

`parse_args` reads two dataclasses from the command line with `transformers.HfArgumentParser`:
`ResNetRecipeArguments` (data, class order, image size and normalisation, model, output, Hub) and
`ResNetTrainingArguments` (flat training flags that become a `ResNetContinualConfig`). `run` loads the
data (a Hub dataset or a local image folder), cuts it into tasks (`split_class_incremental`), builds the
model and runs `ContinualTrainer` on it (the BN family's loop, `hf_pmi.resnet.runner`) with a checkpoint
per task under ``output_dir/task-{t}`` (a rerun resumes) and, with ``--push_to_hub``, a Hub branch per
task. It prints the accuracy matrix and writes ``output_dir/results.json``.

Defaults are the reference's ResNet scripts (``RuilinTong/PMI-CFS-DFCL``, ``ResNet-32/scripts/
task_cont_{cifar100,tiny}_{5,10,20}_task.sh``, the code method.md names), mapped onto `learn_tasks`:

- ``epochs`` 200: ``max_epochs`` of the first task, SGD ``--learning_rate`` 0.1 (``base_lr``), x0.1 at epochs 80
  and 120;
- ``later_epochs`` 160 in the reference's stages ``epochs='20,20,0,0,120'`` (`hf_pmi.resnet.training`): the
  new task's classifier rows alone (backbone frozen, eval mode, lr 0.1), then + the last residual block
  (lr 0.05), then everything at ``final_stage_lr`` (``lrs``: 1e-2 for CIFAR-100 10 / 20 tasks, 5e-3 for
  CIFAR-100 5 tasks and every Tiny-ImageNet split), each stage a fresh SGD with x0.1 at 50 % / 75 %; the
  rows of earlier classes are in no stage's optimiser (``--schedule one_cycle``: hf_pmi's earlier loop);
- ``--per_device_train_batch_size`` 128 (per process), ``head_epochs`` 40 and ``head_lr`` 0.005 (``finetuning_epochs`` / ``finetuning_lr``),
  the head's CE weighted by the classes seen in the task's batches (``cls_count``); momentum 0.9 and weight
  decay 5e-4 are `ResNetContinualConfig`'s, equal to the reference's;
- augmentation: per-image random crop (``--shift`` 4 px zero padding) and horizontal flip, as CIFAR
  practice (the reference's transforms are not in its repository: assumed; Tiny-ImageNet gets the same);
  replayed samples are not augmented;
- ``replay_per_class`` (None): the reference's buffer, ``init_samples + t x per_task_samples`` samples over
  the old classes at task t (6000 + 5000 t / 3000 + 2000 t / 2000 + 1000 t for 5 / 10 / 20 tasks, both
  datasets), e.g. 550 per class at CIFAR-100 5 tasks' task 1; other task counts: 3000 + 2000 t;
- ``regenerate`` (True): after each task, the old classes' Gaussians and contrastive models are re-fitted
  on the pool seen through the new model and every seen class is inverted anew (``update_buffer``,
  ``generate_data_by_selection``); ``selection`` ``cfs``: contrastive feature selection with ``cont_step``
  40 and ``cont_rslt`` 0.5 (`hf_pmi.resnet.learner`);
- ``l_ft`` (None): 1.5 for 5 and 10 tasks, 1.0 for 20 (``lambda_ft``); the other loss weights are
  `PMI_RESNET_WEIGHTS` (``lambda_ce`` 0.75, ``lambda_hkd`` 0.15, ``lambda_rkd`` 0.5);
- inversion: `BNInversionConfig`'s defaults, which are the reference's (50 chain steps at lr 0.8, 160
  refinement steps at lr 0.4, batches of 4000; Tiny-ImageNet's recipe refines 1000 at a time,
  ``gen_batch_size``);
- ``--max_grad_norm`` 0 (the reference never clips; Trainer's default would be 1.0) and
  ``--gradient_accumulation_steps`` 1: every phase runs in `transformers.Trainer`'s loop (`hf_pmi.resnet.loop`);
- class order: a permutation drawn with seed 1993 (method.md, LAMDA-PILOT style); the reference reads
  its own order file, which ``--class_order_file`` can take.

The four readings of the reference that hf_pmi's library defaults do not share are the recipes' defaults
(docs/resnet.md, "Remaining deviations", measures each): ``--loss_form product`` (the reference's ``ce + hkd +
rkd x ft``, where method.md and R-DFCIL sum), ``--target_classes random`` (each inversion target's class drawn
at random), ``--crop_fill black`` (torchvision pads before normalising) and ``--head_counts running`` (the head
fine-tuning keeps counting classes; the reference prints its counts after it). Assumed, not readable in the
reference (compiled only): the augmentation (CIFAR practice) and ``--last_stage block`` (PODNet's ``stage_4``).

Example:
    >>> recipe, training = parse_args(["--output_dir", "out", "--num_tasks", "20", "--method", "lwf"])
    >>> config = training.continual_config(recipe.num_tasks, num_classes=100)
    >>> config.method, config.epochs, config.init_samples, config.per_task_samples, config.weights["l_ft"]
    ('lwf', 200, 2000, 1000, 1.0)
    >>> config.stage_lrs, training.continual_config(5, 100).stage_lrs  # CIFAR-100 20 tasks; 5 tasks
    ((0.1, 0.05, 0.01), (0.1, 0.05, 0.005))
    >>> config.loss_form, config.target_classes, config.head_counts, [round(v, 2) for v in config.crop_fill]
    ('product', 'random', 'running', [-1.9, -1.9, -1.6])
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..validation import check_local_path, check_output_dir_writable
from .continual import CHOICES, METHODS, ResNetContinualConfig, black_fill
from .inversion import BNInversionConfig
from .losses import PMI_RESNET_WEIGHTS

# The reference's buffer by number of tasks, both datasets: init_samples + t x per_task_samples at task t.
REFERENCE_SAMPLES_PER_TASK = {5: 5000, 10: 2000, 20: 1000}
REFERENCE_INIT_SAMPLES = {5: 6000, 10: 3000, 20: 2000}
OTHER_SAMPLES_PER_TASK, OTHER_INIT_SAMPLES = 2000, 3000  # task counts without a script: the 10-task buffer
# The last stage's lr (lrs '1e-1,5e-2,0,0,x'): 1e-2 for CIFAR-100 10 and 20 tasks, 5e-3 for the rest.
REFERENCE_FINAL_STAGE_LR = {("cifar100", 10): 1e-2, ("cifar100", 20): 1e-2}
DEFAULT_FINAL_STAGE_LR = 5e-3
DATASETS = ("cifar100", "tiny-imagenet")
REFERENCE_L_FT = {20: 1.0}  # lambda_ft of the 20-task scripts; 1.5 (PMI_RESNET_WEIGHTS) otherwise
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)  # its training set's moments
MIN_IMAGE_SIZE = 4  # two stride-2 stages leave a 1x1 map at 4 px


@dataclass
class ResNetRecipeArguments:
    """Data, class order, image preprocessing, model and output of a ResNet recipe run."""

    output_dir: str = field(metadata={"help": "Folder of the per-task checkpoints (task-{t}) and results.json; "
                                      "a rerun with the same flags resumes after the last finished task."})
    dataset_name: str | None = field(default="uoft-cs/cifar100", metadata={"help": "Hub dataset id (ignored with --data_dir)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_dir: str | None = field(default=None, metadata={"help": "Local image folder <data_dir>/{train,test}/<class>/*.png; "
                                 "its columns are imagefolder's 'image' and 'label' whatever --image_column/--label_column say."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    test_split: str = field(default="test", metadata={"help": "Test split (Tiny-ImageNet on the Hub: 'valid')."})
    test_size: float = field(default=0.2, metadata={"help": "Share of the training split held out (stratified, seeded "
                             "by --seed) when the data has no --test_split; 0 refuses such data instead."})
    image_column: str = field(default="img", metadata={"help": "Image column (uoft-cs/cifar100: 'img')."})
    label_column: str = field(default="fine_label", metadata={"help": "Label column, a ClassLabel (uoft-cs/cifar100: 'fine_label')."})
    num_tasks: int = field(default=5, metadata={"help": "Number of equal tasks (the paper: 5, 10 or 20)."})
    class_order_seed: int = field(default=1993, metadata={"help": "Seed of the class order (method.md: 1993)."})
    class_order_file: str | None = field(default=None, metadata={"help": "Class order instead: dataset label ids in "
                                         "learning order, a JSON list or integers separated by commas/whitespace."})
    image_size: int = field(default=32, metadata={"help": "Images are resized (bilinear) to this square size."})
    mean: list[float] = field(default_factory=lambda: list(CIFAR100_MEAN),
                              metadata={"help": "Per-channel mean of the normalisation (CIFAR-100's training set)."})
    std: list[float] = field(default_factory=lambda: list(CIFAR100_STD),
                             metadata={"help": "Per-channel std of the normalisation (CIFAR-100's training set)."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "None: a fresh ResNet-32 (seeded by --seed); "
                                           "else a ResNet32ForImageClassification folder or Hub id (its classes come first)."})
    blocks_per_stage: int = field(default=5, metadata={"help": "Residual blocks per stage of a fresh model (5: ResNet-32)."})
    reference_dataset: str = field(default="cifar100", metadata={"help": "Whose reference scripts give the defaults "
                                   "that differ by dataset (the last stage's lr).", "choices": list(DATASETS)})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo that --push_to_hub pushes to (branch task-{t})."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push every finished task to --hub_model_id "
                              "(token and endpoint from HF_TOKEN / HF_ENDPOINT or the cached login)."})

    def __post_init__(self):
        if self.num_tasks < 1:
            raise ValueError(f"--num_tasks must be >= 1, got {self.num_tasks}.")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"--image_size must be >= {MIN_IMAGE_SIZE} (two stride-2 stages), got {self.image_size}.")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"--mean and --std take 3 values each (RGB), stds > 0; got {self.mean} and {self.std}.")
        if not 0 <= self.test_size < 1:
            raise ValueError(f"--test_size is a share of the training split in [0, 1), got {self.test_size}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id <namespace/name>, the repo to push the tasks to.")


@dataclass
class ResNetTrainingArguments:
    """Training flags of a ResNet recipe run; `continual_config` turns them into a `ResNetContinualConfig`."""

    method: str = field(default="pmi", metadata={"help": "Continual method.", "choices": list(METHODS)})
    epochs: int = field(default=200, metadata={"help": "Epochs of the first task (reference max_epochs 200)."})
    later_epochs: int = field(default=160, metadata={"help": "Epochs of every later task (reference: 20+20+0+0+120 gradual stages)."})
    head_epochs: int = field(default=40, metadata={"help": "Head fine-tuning epochs after each later task (reference 40)."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Real images per step and process "
                                             "(reference 128); replay adds as many."})
    learning_rate: float = field(default=0.1, metadata={"help": "SGD lr of the first task, x0.1 at 40 %% and 60 %% of "
                                 "its epochs (reference base_lr 0.1, milestones 80 / 120 of 200)."})
    # Trainer's loop runs every phase (hf_pmi.resnet.loop); these are its settings, with the reference's values
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping bound; 0: none (the reference "
                                 "never clips; Trainer's own default would be 1.0)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step (reference 1)."})
    report_to: str = field(default="none", metadata={"help": "Trackers of the step losses and task metrics "
                           "(Trainer's report_to: tensorboard, wandb, ...)."})
    logging_steps: int = field(default=50, metadata={"help": "Optimizer steps between two logged losses."})
    schedule: str = field(default="staged", metadata={"help": "'staged' (reference: later tasks train the new rows, then "
                          "+ the last block, then everything at a low lr; old rows frozen) or 'one_cycle' (hf_pmi before "
                          "issue 30).", "choices": ["staged", "one_cycle"]})
    final_stage_lr: float | None = field(default=None, metadata={"help": "lr of the last stage; None: the reference's "
                                         "(1e-2 for CIFAR-100 10 / 20 tasks, 5e-3 otherwise). The first two: 0.1, 0.05."})
    head_lr: float = field(default=0.005, metadata={"help": "SGD lr of the head fine-tuning (reference 0.005)."})
    shift: int = field(default=4, metadata={"help": "Per-image random crop after zero padding of this many pixels "
                       "(CIFAR practice, RandomCrop(32, padding=4))."})
    flip: bool = field(default=True, metadata={"help": "Per-image random horizontal flip (CIFAR practice)."})
    crop_fill: str = field(default="black", metadata={"help": "Crop padding: 'black' (the reference: torchvision pads "
                           "before normalising) or 'mean' (0 of the normalised tensor; hf_pmi's library default).",
                           "choices": ["black", "mean"]})
    loss_form: str = field(default="product", metadata={"help": "'product' (the reference's code: ce + hkd + rkd x ft) "
                           "or 'sum' (R-DFCIL, method.md; hf_pmi's library default).", "choices": list(CHOICES["loss_form"])})
    target_classes: str = field(default="random", metadata={"help": "Classes of the inversion targets: 'random' (the "
                                "reference: each target's class drawn uniformly) or 'equal' shares.",
                                "choices": list(CHOICES["target_classes"])})
    head_counts: str = field(default="running", metadata={"help": "Class counts weighing the head fine-tuning: "
                             "'running' (still counted during it: the reference prints cls_count after its fine-tuning) "
                             "or 'fixed' at the end of the main stages.", "choices": list(CHOICES["head_counts"])})
    last_stage: str = field(default="block", metadata={"help": "What the second later-task stage adds: 'block' (the last "
                            "residual block, PODNet's stage_4 in the reference's backbone) or 'stage' (the whole last stage).",
                            "choices": list(CHOICES["last_stage"])})
    replay_per_class: int | None = field(default=None, metadata={"help": "Replayed samples per old class; None: the "
                                         "reference's buffer, init_samples + t x per_task_samples at task t (6000 + t x "
                                         "5000 / 3000 + t x 2000 / 2000 + t x 1000 for 5 / 10 / 20 tasks)."})
    regenerate: bool = field(default=True, metadata={"help": "Reference: re-fit the old classes' Gaussians on the pool "
                             "through the new model and invert every seen class anew after each task; False: once."})
    selection: str = field(default="cfs", metadata={"help": "Inversion targets: 'cfs' (reference, cont_step 40, "
                           "cont_rslt 0.5) or 'gaussian'.", "choices": ["cfs", "gaussian"]})
    l_ft: float | None = field(default=None, metadata={"help": "Weight of the balancing CE; None: 1.5, or 1.0 for 20 tasks (reference)."})
    inversion_layer_steps: int = field(default=50, metadata={"help": "Adam steps per block of the chain (reference 50)."})
    inversion_refine_steps: int = field(default=160, metadata={"help": "Full-model refinement steps (reference 160)."})
    inversion_refine_batch: int = field(default=4000, metadata={"help": "Targets refined together (reference 4000; Tiny-ImageNet 1000)."})
    seed: int = field(default=0, metadata={"help": "Seed of the model's initialisation, batches, targets and inversion."})

    def continual_config(self, num_tasks: int, num_classes: int, dataset: str = "cifar100",
                         mean=CIFAR100_MEAN, std=CIFAR100_STD) -> ResNetContinualConfig:
        """The `ResNetContinualConfig` of these flags for `num_classes` classes in `num_tasks` tasks of `dataset`'s
        reference scripts, the images normalised by `mean` and `std` (the black crop padding's value)."""
        buffer = {}
        if self.replay_per_class is None:
            buffer = {"init_samples": REFERENCE_INIT_SAMPLES.get(num_tasks, OTHER_INIT_SAMPLES),
                      "per_task_samples": REFERENCE_SAMPLES_PER_TASK.get(num_tasks, OTHER_SAMPLES_PER_TASK)}
        low = self.final_stage_lr
        if low is None:
            low = REFERENCE_FINAL_STAGE_LR.get((dataset, num_tasks), DEFAULT_FINAL_STAGE_LR)
        l_ft = self.l_ft if self.l_ft is not None else REFERENCE_L_FT.get(num_tasks, PMI_RESNET_WEIGHTS["l_ft"])
        inversion = BNInversionConfig(layer_steps=self.inversion_layer_steps, refine_steps=self.inversion_refine_steps,
                                      refine_batch=self.inversion_refine_batch)
        return ResNetContinualConfig(
            method=self.method, epochs=self.epochs, later_epochs=self.later_epochs, head_epochs=self.head_epochs,
            batch_size=self.per_device_train_batch_size, lr=self.learning_rate, head_lr=self.head_lr, shift=self.shift, flip=self.flip,
            schedule=self.schedule, stage_lrs=(0.1, 0.05, low), regenerate=self.regenerate, selection=self.selection,
            replay_per_class=self.replay_per_class or 1, **buffer,
            crop_fill=black_fill(mean, std) if self.crop_fill == "black" else None, loss_form=self.loss_form,
            target_classes=self.target_classes, head_counts=self.head_counts, last_stage=self.last_stage,
            weights={**PMI_RESNET_WEIGHTS, "l_ft": l_ft}, inversion=inversion, seed=self.seed)


def parse_args(argv: list[str] | None = None, defaults: dict[str, Any] | None = None, prog: str | None = None):
    """``(ResNetRecipeArguments, ResNetTrainingArguments)`` from `argv` (None: ``sys.argv``), with a recipe's
    `defaults` (flag name -> value) in place of the dataclasses' own."""
    from transformers import HfArgumentParser

    from ..arguments import parse_flags

    parser = HfArgumentParser((ResNetRecipeArguments, ResNetTrainingArguments), prog=prog)
    known = {f.name for cls in (ResNetRecipeArguments, ResNetTrainingArguments) for f in dataclasses.fields(cls)}
    unknown = sorted(set(defaults or {}) - known)
    if unknown:
        raise ValueError(f"Recipe defaults name unknown flags {unknown}; the flags are {sorted(known)}.")
    parser.set_defaults(**(defaults or {}))
    recipe, training = parse_flags(parser, argv)  # an unknown flag: a usage error naming it and the closest one
    return recipe, training


def build_tasks(recipe: ResNetRecipeArguments, seed: int = 0):
    """`ContinualTasks` of the recipe's data (a held-out test split when it has none and --test_size > 0)."""
    from ..data import load_image_dataset, read_class_order, split_class_incremental

    image_column, label_column = recipe.image_column, recipe.label_column
    if recipe.data_dir:
        image_column, label_column = "image", "label"  # imagefolder's columns
    data = load_image_dataset(recipe.dataset_name, recipe.dataset_config, recipe.data_dir,
                              train_split=recipe.train_split, test_split=recipe.test_split,
                              test_size=recipe.test_size, label_column=label_column, seed=seed)
    order = read_class_order(recipe.class_order_file) if recipe.class_order_file else None
    return split_class_incremental(data, num_tasks=recipe.num_tasks, class_order=order, seed=recipe.class_order_seed,
                                   image_column=image_column, label_column=label_column,
                                   train_split=recipe.train_split, test_split=recipe.test_split)


def build_model(recipe: ResNetRecipeArguments, seed: int):
    """A fresh ResNet-32 (no classes yet, seeded) or the pretrained ``--model_name_or_path``."""
    from transformers import set_seed

    from .configuration import ResNet32Config
    from .modeling import ResNet32ForImageClassification

    if recipe.model_name_or_path is None:
        set_seed(seed)
        config = ResNet32Config(blocks_per_stage=recipe.blocks_per_stage, num_labels=0, image_size=recipe.image_size)
        return ResNet32ForImageClassification(config)
    model = ResNet32ForImageClassification.from_pretrained(recipe.model_name_or_path)
    if model.config.image_size != recipe.image_size:
        raise ValueError(f"{recipe.model_name_or_path} was trained at {model.config.image_size} px but --image_size is "
                         f"{recipe.image_size}; pass --image_size {model.config.image_size}.")
    return model


def run(recipe: ResNetRecipeArguments, training: ResNetTrainingArguments) -> dict:
    """Learn the recipe's tasks with `ContinualTrainer`; prints the accuracy matrix, writes ``results.json``
    (the `ContinualResult`, the flags, the loop's config and the inversion counts) and returns that record."""
    from transformers import ViTImageProcessorPil
    from transformers.image_utils import PILImageResampling

    from ..config import ContinualConfig
    from ..hub import exit_if_pushes_failed
    from ..lock import RunLock
    from ..metrics import a_last_scope, format_matrix, format_metric
    from ..trainer import ContinualTrainer

    training.continual_config(recipe.num_tasks, recipe.num_tasks)  # check the flags before any data is read
    if recipe.model_name_or_path:
        check_local_path(recipe.model_name_or_path, "model folder")  # a missing folder is not a bad Hub id
    check_output_dir_writable(recipe.output_dir)
    RunLock(recipe.output_dir).check()  # another run writing there is refused before the data is read
    # a rerun with the same flags resumes after the last finished task (none: it starts)
    args = ContinualConfig(output_dir=recipe.output_dir, method=training.method, seed=training.seed,
                           push_to_hub=recipe.push_to_hub, hub_model_id=recipe.hub_model_id, resume_from_checkpoint="true",
                           report_to=training.report_to, max_grad_norm=training.max_grad_norm,
                           gradient_accumulation_steps=training.gradient_accumulation_steps,
                           logging_steps=training.logging_steps)
    tasks = build_tasks(recipe, seed=training.seed)
    model = build_model(recipe, training.seed)
    config = training.continual_config(len(tasks), len(tasks.class_order), recipe.reference_dataset, recipe.mean, recipe.std)
    processor = ViTImageProcessorPil(size={"height": recipe.image_size, "width": recipe.image_size},
                                     image_mean=list(recipe.mean), image_std=list(recipe.std),
                                     resample=PILImageResampling.BILINEAR)
    trainer = ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=processor, method_config=config)
    result = trainer.train()
    path = os.path.join(recipe.output_dir, "results.json")
    record = {**result.to_dict(), "recipe": dataclasses.asdict(recipe), "config": dataclasses.asdict(config),
              "device": str(trainer.args.device), "processes": trainer.accelerator.num_processes,
              **trainer.family_run.inversion}
    if not trainer.is_world_process_zero():  # one process writes and reports
        return record
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)
    print(f"\n{config.method} (seed {config.seed}), accuracy (%) after task i on task j:\n"
          f"{format_matrix(result.accuracy_matrix)}")
    print(f"A_last {format_metric(result.a_last)} (over {a_last_scope(result.unevaluated_tasks)})  A_avg "
          f"{format_metric(result.a_avg)}  forgetting {format_metric(result.forgetting)}  -> {path}")
    exit_if_pushes_failed(trainer.failed_pushes)  # exit status 1, each retry command printed
    return record
