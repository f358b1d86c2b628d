"""What the benchmark recipes and the ``hf-pmi`` command share: data and model arguments, and one run.

`RecipeArguments` names the data (a Hub dataset or a local image folder), how its classes are cut
into tasks (class order from a seed or a file, first-task size and increment, or a number of
equal tasks) and the model (a CLIP by Hub id or folder, LoRA settings). `parse_run_args` reads
them, the `ContinualConfig` and the chosen method's config (``--method`` decides which method
flags exist, `hf_pmi.arguments`) from the command line; `run_recipe` turns them into a finished
`ContinualTrainer.train()`. A recipe script is then a few lines: its reference defaults and a call
(see ``recipes/``).

Example:
    >>> from transformers import HfArgumentParser
    >>> from hf_pmi.recipe import RecipeArguments, task_split_kwargs
    >>> (recipe,) = HfArgumentParser(RecipeArguments).parse_args_into_dataclasses(
    ...     ["--initial_classes", "50", "--classes_per_task", "10"])
    >>> task_split_kwargs(recipe)
    {'initial_classes': 50, 'classes_per_task': 10, 'class_order': None, 'seed': 1993}
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from .arguments import GroupedArgumentParser, config_file, flag_dataclasses, from_flags, parse_flags, short_help
from .blocks import layers_below_pattern
from .config import DEFAULT_METHOD, ContinualConfig
from .data import load_image_dataset, read_class_order
from .methods import method_class
from .metrics import a_last_scope, format_metric
from .modeling import DEFAULT_LORA_TARGETS
from .validation import check_local_path, require_count


@dataclass
class RecipeArguments:
    """Data, task split and model settings of a continual run (flags of every recipe and of ``hf-pmi train``)."""

    model_name_or_path: str = field(default="openai/clip-vit-base-patch16", metadata={"help": "CLIP: Hub id or folder."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id (ignored with --data_dir)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Local image folder (<data_dir>/{train,test}/<class name>/*.png)."}
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (then set --max_steps per task)."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    test_split: str = field(default="test", metadata={"help": "Test split."})
    test_size: float = field(
        default=0.2,
        metadata={"help": "Share of the training split held out (stratified, seeded) when the data has no test split "
                  "(ImageNet-R: 0.2, the usual 80/20 split)."},
    )
    image_column: str = field(default="image", metadata={"help": "Image column."})
    label_column: str = field(default="label", metadata={"help": "Label column (a ClassLabel)."})
    num_tasks: int | None = field(
        default=10, metadata={"help": "Number of equal tasks (ignored with --initial_classes/--classes_per_task)."}
    )
    initial_classes: int | None = field(default=None, metadata={"help": "Classes of the first task (B in 'B-inc')."})
    classes_per_task: int | None = field(default=None, metadata={"help": "Classes of every later task (the increment)."})
    class_order_seed: int = field(
        default=1993, metadata={"help": "Seed of the class order (reference: 1993); ignored with --class_order_file."}
    )
    class_order_file: str | None = field(
        default=None, metadata={"help": "File with the class order: dataset label ids (JSON list, or separated by "
                                "commas/whitespace), in learning order."}
    )
    template: str = field(default="a bad photo of a {}.", metadata={"help": "Prompt template (the reference's)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank; 0 trains the whole model instead."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_target_modules: str = field(
        default=DEFAULT_LORA_TARGETS, metadata={"help": "Regex of modules to adapt (default: vision q/v proj)."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained whole next to LoRA (e.g. text_projection)."}
    )

    def __post_init__(self):
        require_count("lora_r", self.lora_r, 0, " (0: train the whole model without LoRA)")


def task_split_kwargs(recipe: RecipeArguments) -> dict:
    """Keyword arguments of `split_class_incremental` from the recipe's flags."""
    order = read_class_order(recipe.class_order_file) if recipe.class_order_file else None
    if recipe.initial_classes is not None or recipe.classes_per_task is not None:
        cut = {"initial_classes": recipe.initial_classes, "classes_per_task": recipe.classes_per_task}
    else:
        cut = {"num_tasks": recipe.num_tasks}
    return {**cut, "class_order": order, "seed": recipe.class_order_seed}


def load_data(recipe: RecipeArguments, seed: int = 0):
    """The dataset (a `DatasetDict`), with a held-out test split when it has none."""
    return load_image_dataset(recipe.dataset_name, recipe.dataset_config, recipe.data_dir, streaming=recipe.streaming,
                              train_split=recipe.train_split, test_split=recipe.test_split, test_size=recipe.test_size,
                              label_column=recipe.label_column, seed=seed)


def build_tasks(recipe: RecipeArguments, seed: int = 0):
    """`ContinualTasks` of the recipe's data; ``metadata["dataset"]`` is the Hub id (None for a local folder)."""
    from .data import split_class_incremental

    tasks = split_class_incremental(
        load_data(recipe, seed),
        image_column=recipe.image_column,
        label_column=recipe.label_column,
        train_split=recipe.train_split,
        test_split=recipe.test_split,
        **task_split_kwargs(recipe),
    )
    tasks.metadata["dataset"] = None if recipe.data_dir else recipe.dataset_name
    return tasks


def replay_block(method_config) -> int:
    """The vision block a method replays at (``inversion.start_block``; 1 for methods without inversion)."""
    inversion = getattr(method_config, "inversion", None)
    return inversion.start_block if inversion is not None else 1


def lora_block(requested: int | None, method_config, num_layers: int) -> int:
    """The first vision block a demo recipe's LoRA adapts (block k is encoder layer k - 2).

    `requested` (``--lora_from_block``), else the upper half of the encoder, block ``num_layers // 2 + 2``:
    at a quarter of the inversion budget the demos vary less across seeds with the lower half frozen
    (``benchmarks/synthesis_front.py``, docs/benchmarks.md). Never below the replay block, since replay
    skips the blocks under it.

    Example:
        >>> from hf_pmi.methods.pmi import PMIConfig
        >>> lora_block(None, PMIConfig(), num_layers=4), lora_block(1, PMIConfig(), num_layers=4)
        (4, 1)
    """
    block = requested if requested is not None else num_layers // 2 + 2
    return max(block, replay_block(method_config))


def build_model(recipe: RecipeArguments, block: int = 1):
    """The `ContinualCLIP` (LoRA on the vision tower unless ``lora_r`` is 0) and its processor. With replay
    at vision `block` > 2, LoRA leaves out the encoder layers below it (`hf_pmi.blocks.layers_below_pattern`)."""
    from transformers import AutoProcessor

    from .modeling import ContinualCLIP

    lora = None
    if recipe.lora_r > 0:
        from peft import LoraConfig

        lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, target_modules=recipe.lora_target_modules,
                          modules_to_save=recipe.lora_modules_to_save, exclude_modules=layers_below_pattern(block))
    check_local_path(recipe.model_name_or_path, "CLIP model folder")  # a missing folder is not a bad Hub id
    processor = AutoProcessor.from_pretrained(recipe.model_name_or_path)
    model = ContinualCLIP.from_clip(recipe.model_name_or_path, templates=[recipe.template], lora=lora)
    return model, processor


def _parser_classes(part: type) -> tuple[type, ...]:
    """The dataclasses `HfArgumentParser` parses for `part`: a config with a ``flag_prefix`` (a method
    config, `NamesOnlyConfig`, ...) by its prefixed flags, any other dataclass as it is."""
    return flag_dataclasses(part) if hasattr(part, "flag_prefix") else (part,)


def _built(part: type, parsed: list) -> Any:
    return from_flags(part, parsed) if hasattr(part, "flag_prefix") else parsed[0]


def parse_run_args(argv: list[str] | None = None, parts: tuple[type, ...] = (RecipeArguments,),
                   defaults: dict[str, Any] | None = None, prog: str | None = None) -> tuple:
    """Parse the command line of a run: the dataclasses `parts`, a `ContinualConfig` and the config of
    the method ``--method`` names (each config an argument group of prefixed flags). `defaults` maps
    flags to a recipe's defaults; those of flags the chosen method does not have are ignored.

    Returns ``(*parts, args, method_config)``.

    Example:
        >>> recipe, args, method_config = parse_run_args(
        ...     ["--output_dir", "out", "--method", "pmi", "--inversion_layer_steps", "7"],
        ...     defaults={"inversion_refine_steps": 5, "lwf_temperature": 3.0})
        >>> args.method, method_config.inversion.layer_steps, method_config.inversion.refine_steps
        ('pmi', 7, 5)
    """
    defaults = dict(defaults or {})
    argv, file_values = config_file(list(sys.argv[1:] if argv is None else argv))  # --config run.yaml
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--method", default=file_values.get("method", defaults.get("method")))
    method = probe.parse_known_args(argv)[0].method or DEFAULT_METHOD
    config_cls = method_class(method).config_class
    groups = [_parser_classes(part) for part in (*parts, ContinualConfig, config_cls)]
    classes = [cls for group in groups for cls in group]
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:  # the common flags; every flag with --help-all
        print(short_help(prog, classes, {"method": DEFAULT_METHOD, **(defaults or {})}))
        raise SystemExit(0)
    parser = GroupedArgumentParser(classes, prog=prog, last_groups=[ContinualConfig.default_flag_group])
    if "--help-all" in argv:
        parser.print_help()
        raise SystemExit(0)
    dests = {f.name for cls in classes for f in dataclasses.fields(cls)}
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in dests})
    parsed = list(parse_flags(parser, argv, file_values))  # an unknown flag: a usage error naming it and the closest one
    out = []
    for part, group in zip((*parts, ContinualConfig, config_cls), groups):
        out.append(_built(part, parsed[: len(group)]))
        parsed = parsed[len(group):]
    return tuple(out)


def run_recipe(recipe: RecipeArguments, args, method_config=None):
    """Train the whole task sequence; prints the accuracy matrix and returns the `ContinualResult`."""
    from transformers import set_seed

    from .hub import exit_if_pushes_failed
    from .lock import RunLock
    from .trainer import ContinualTrainer

    if args.process_index == 0:
        RunLock(args.output_dir).check()  # before loading data and model: another run writing there is refused
    tasks = build_tasks(recipe, seed=args.seed)
    set_seed(args.seed)  # LoRA weights are drawn in build_model, before the Trainer seeds anything
    model, processor = build_model(recipe, replay_block(method_config))
    trainer = ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=processor,
                               method_config=method_config)
    result = trainer.train()
    if trainer.is_world_process_zero():
        print(f"\n{args.method} (seed {args.seed}), accuracy (%) after task i on task j:\n{result.table()}")
        print(f"A_last {format_metric(result.a_last)} (over {a_last_scope(result.unevaluated_tasks)})  A_avg "
              f"{format_metric(result.a_avg)}  forgetting {format_metric(result.forgetting)}  "
              f"-> {os.path.join(args.output_dir, 'results.json')}")
        exit_if_pushes_failed(trainer.failed_pushes)  # exit status 1, each retry command printed
    return result
