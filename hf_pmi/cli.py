"""The ``hf-pmi`` command: ``hf-pmi train ...`` runs a continual sequence, ``hf-pmi eval ...`` scores a checkpoint.

    hf-pmi train --output_dir runs/cifar --dataset_name uoft-cs/cifar100 --image_column img \\
        --label_column fine_label --num_tasks 10 --method pmi
    hf-pmi eval --checkpoint runs/cifar/task-9 --dataset_name uoft-cs/cifar100 --image_column img \\
        --label_column fine_label
    hf-pmi train --family batchnorm --output_dir runs/r32 --dataset_name uoft-cs/cifar100 --num_tasks 5 \\
        --method pmi --learning_rate 0.1 --per_device_train_batch_size 128   # a ResNet-32 (the BN family)
    hf-pmi train --help                   # the common flags
    hf-pmi train --method pmi --help-all  # every flag, by group: recipe, continual run, pmi's config, Trainer
    hf-pmi --version

``train`` (``--family clip``, the default) takes the flags of `hf_pmi.recipe.RecipeArguments`, `ContinualConfig`
and the config of the method ``--method`` names (default: ``pmi``; `hf_pmi.recipe.parse_run_args`; the recipes in ``recipes/``
are the same run with a benchmark's defaults). ``--help`` lists them by group. ``train --family batchnorm`` runs
the BatchNorm family (`hf_pmi.resnet.recipe`, the ResNet recipes' flags): the same flag names where the
settings are the same (Trainer's: ``--learning_rate``, ``--per_device_train_batch_size``, ``--max_grad_norm``,
``--gradient_accumulation_steps``, ``--report_to``; ``--output_dir``, ``--dataset_name``, ``--data_dir``,
``--num_tasks``, ``--method``, ``--seed``, ``--push_to_hub``, ``--hub_model_id``). For several processes launch the module:
``accelerate launch -m hf_pmi.cli train ...``.

``eval`` scores a checkpoint (a folder or a Hub repo + ``--revision``; a CLIP run's or a BatchNorm classifier's
task folder) on the test split of a dataset: the classes the checkpoint knows are matched by name, and the accuracy over them and per
task of the checkpoint is printed as JSON (and written to ``--output_file``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

FAMILIES = ("clip", "batchnorm")  # `hf-pmi train --family` (hf_pmi.families)
COMMANDS = {
    "train": "learn a class-incremental task sequence (see `hf-pmi train --help`)",
    "eval": "accuracy of a checkpoint on a dataset's test split (see `hf-pmi eval --help`)",
}


@dataclass
class EvalArguments:
    checkpoint: str = field(metadata={"help": "Checkpoint folder (task-<i>/) or Hub repo id."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision, e.g. task-3."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id (ignored with --data_dir)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_dir: str | None = field(default=None, metadata={"help": "Local image folder (train/ and test/ subfolders)."})
    test_split: str = field(default="test", metadata={"help": "Split to score."})
    test_size: float = field(default=0.2, metadata={"help": "Held-out share when the data has no test split."})
    seed: int = field(default=42, metadata={"help": "Seed of that held-out split (use the training run's)."})
    image_column: str = field(default="image", metadata={"help": "Image column."})
    label_column: str = field(default="label", metadata={"help": "Label column (a ClassLabel)."})
    batch_size: int = field(default=128, metadata={"help": "Evaluation batch size."})
    output_file: str | None = field(default=None, metadata={"help": "Also write the scores to this JSON file."})


def _usage() -> str:
    lines = ["usage: hf-pmi <command> [flags]  |  hf-pmi --version", "",
             "Data-free continual learning of CLIP (hf_pmi).", "", "commands:"]
    lines += [f"  {name:<7} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def version_text() -> str:
    """``hf-pmi <version>`` and the versions of the libraries it runs on."""
    from importlib.metadata import PackageNotFoundError, version

    from .version import __version__

    parts = []
    for name in ("torch", "transformers", "peft", "datasets", "accelerate", "huggingface_hub"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return f"hf-pmi {__version__} ({', '.join(parts)})"


def train(argv: list[str]) -> None:
    """``--family clip`` (default): `hf_pmi.recipe`'s run of a CLIP model; ``--family batchnorm``: a ResNet-32 from
    scratch or ``--model_name_or_path`` (`hf_pmi.resnet.recipe`). Both take Trainer's flag names
    (``--learning_rate``, ``--per_device_train_batch_size``, ``--report_to``, ...)."""
    import argparse

    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--family", choices=FAMILIES, default="clip")
    family, rest = probe.parse_known_args(argv)
    if family.family == "batchnorm":
        from .resnet.recipe import parse_args, run

        run(*parse_args(rest, prog="hf-pmi train --family batchnorm"))
        return
    from .recipe import parse_run_args, run_recipe

    recipe, args, method_config = parse_run_args(rest, prog="hf-pmi train")
    run_recipe(recipe, args, method_config)


def evaluate_checkpoint(opts: EvalArguments) -> dict:
    """Accuracy of the checkpoint on the classes it knows (matched by name), overall and per task; a CLIP
    checkpoint or a BatchNorm classifier's task folder (`hf_pmi.families`), with the same flags."""
    import os

    import numpy as np
    import torch

    from .checkpoint import STATE_NAME, read_state
    from .data import class_names_of
    from .evaluation import task_accuracies
    from .families import family_for_checkpoint
    from .integrity import verify_checksums
    from .recipe import RecipeArguments, load_data
    from .resolve import resolve_pretrained_folder

    folder = resolve_pretrained_folder(opts.checkpoint, revision=opts.revision)
    state = read_state(folder) if os.path.isfile(os.path.join(folder, STATE_NAME)) else None
    if state is not None:
        verify_checksums(folder, state.get("checksums"))  # the processor's files too, not only the model's
    family = family_for_checkpoint(state or {}).name
    class_names, predict = (_batchnorm_predictor if family == "batchnorm" else _clip_predictor)(folder, opts)
    recipe = RecipeArguments(dataset_name=opts.dataset_name, dataset_config=opts.dataset_config,
                             data_dir=opts.data_dir, test_split=opts.test_split, test_size=opts.test_size,
                             image_column=opts.image_column, label_column=opts.label_column)
    data = load_data(recipe, seed=opts.seed)
    if opts.test_split not in data:
        raise ValueError(f"No {opts.test_split!r} split in {list(data)}; pass --test_split.")
    test = data[opts.test_split]
    names = class_names_of(test, opts.label_column)
    known = {name: i for i, name in enumerate(class_names)}
    label_map = {label: known[name] for label, name in enumerate(names) if name in known}
    if not label_map:
        raise ValueError(f"None of the dataset's classes ({names[:5]}...) is among the checkpoint's classes "
                         f"({class_names[:5]}...): check --dataset_name / --label_column.")
    labels = np.asarray(test.select_columns([opts.label_column]).with_format("numpy")[opts.label_column])
    test = test.select(np.flatnonzero(np.isin(labels, list(label_map))))
    preds, targets = [], []
    with torch.no_grad():
        for start in range(0, len(test), opts.batch_size):
            rows = [test[i] for i in range(start, min(start + opts.batch_size, len(test)))]
            preds.append(predict(rows, label_map))
            targets.append(torch.tensor([label_map[r[opts.label_column]] for r in rows]))
    pred, target = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    scores = {"checkpoint": opts.checkpoint, "revision": opts.revision, "examples": int(len(target)),
              "classes": len(label_map), "accuracy": float((pred == target).mean())}
    if state is not None:
        scores["task_accuracy"] = task_accuracies(pred, target, state["task_classes"])[0]
    return scores


def _clip_predictor(folder: str, opts: EvalArguments):
    """(class names, predict(rows, label_map) -> class ids) of a `ContinualCLIP` checkpoint (routed predictions)."""
    from transformers import AutoProcessor

    from .data import ContinualCollator
    from .modeling import ContinualCLIP

    model = ContinualCLIP.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)

    def predict(rows, label_map):
        batch = ContinualCollator(processor.image_processor, label_map, opts.image_column, opts.label_column)(rows)
        return model(pixel_values=batch["pixel_values"]).prediction_logits.argmax(-1)

    return list(model.class_names), predict


def _batchnorm_predictor(folder: str, opts: EvalArguments):
    """(class names, predict) of a BatchNorm classifier's task folder: its model and the image processor the run
    evaluated with (the folder's `ViTImageProcessorPil`)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from . import resnet  # noqa: F401 (registers ResNet32 with the Auto classes)
    from .images import to_rgb

    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]

    def predict(rows, label_map):
        images = [to_rgb(r[opts.image_column]) for r in rows]  # as the run decoded them (hf_pmi.resnet.data)
        return model(pixel_values=processor(images, return_tensors="pt")["pixel_values"]).logits.argmax(-1)

    return names, predict


def evaluate(argv: list[str]) -> dict:
    from transformers import HfArgumentParser

    from .arguments import parse_flags

    (opts,) = parse_flags(HfArgumentParser(EvalArguments, prog="hf-pmi eval"), argv)
    scores = evaluate_checkpoint(opts)
    text = json.dumps(scores, indent=2)
    print(text)
    if opts.output_file:
        with open(opts.output_file, "w") as f:
            f.write(text + "\n")
    return scores


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version_text())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        train(rest)
    elif command == "eval":
        evaluate(rest)
    else:
        print(f"hf-pmi: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
