"""The shapes world, offline: continual learning on a CLIP whose text tower means something, and
learning classes from their names only.

Needs no network. The backbone is `hf_pmi.testing.backbones.shapes_clip` (a small CLIP pre-trained with the CLIP objective
on rendered shapes and captions, text tower included; with the default ``--pretrain_steps`` it ships with
hf_pmi, made by ``python -m hf_pmi.testing.backbones --export shapes``, otherwise ~20 min on one CPU
thread on first use, then cached), adapted with LoRA. The data are the 16 shape-colour pairs it never saw, cut into 5 tasks;
the last ``--names_only_last`` tasks (default 1) are learned from their class names alone
(`hf_pmi.names_only`, settings ``--names_only_<field>`` of `NamesOnlyConfig`), with no image; their test
images are still used to evaluate them.
``--names_only_last 0`` learns every task from images (any method, e.g. the continual benchmark).

    accelerate launch recipes/clip_shapes.py --output_dir runs/names_only --seed 0

Adding classes by name to someone else's checkpoint (a local folder or a Hub repo + revision):

    python recipes/clip_shapes.py --output_dir runs/more --from_checkpoint runs/names_only/task-4 \\
        --add_names "purple ring" "white cross"

Writes ``results.json`` and one checkpoint per task, like recipes/clip_digits.py; the model card of
a checkpoint marks the classes learned from their names only.
"""

from dataclasses import dataclass, field

from peft import LoraConfig
from transformers import set_seed

from hf_pmi import ContinualCLIP, ContinualTrainer, split_class_incremental
from hf_pmi.names_only import NamesOnlyConfig, make_names_only, names_only_tasks
from hf_pmi.blocks import layers_below_pattern
from hf_pmi.recipe import lora_block, parse_run_args
from hf_pmi.testing import build_processor
from hf_pmi.testing.backbones import PRETRAIN_STEPS, shapes_clip
from hf_pmi.testing.shapes import SHAPES_TEMPLATES, load_shapes_dataset

# Small tasks (~200 images) and the inversion budget of recipes/clip_digits.py (its default).
DEFAULTS = dict(
    method="pmi", num_train_epochs=6, per_device_train_batch_size=32, warmup_steps=10, replay_batch_size=32,
    inversion_layer_steps=12, inversion_first_block_steps=50, inversion_upsample_at=[12, 25, 37],
    inversion_refine_steps=25,
)


@dataclass
class ShapesArguments:
    names_only_last: int = field(
        default=1, metadata={"help": "The last N tasks are learned from their class names only (0: every task from images)."}
    )
    num_tasks: int = field(default=5, metadata={"help": "Tasks to cut the 16 held-out shape-colour pairs into."})
    backbone_dir: str | None = field(default=None, metadata={"help": "Cache folder of the shapes CLIP."})
    pretrain_steps: int = field(default=PRETRAIN_STEPS, metadata={"help": "Pre-training steps of the shapes CLIP."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank on the vision tower."})
    lora_from_block: int | None = field(
        default=None,
        metadata={"help": "LoRA adapts the encoder layers from this vision block on (block k is encoder layer k - 2; "
                  "1 adapts all). Default: the upper half of the encoder (block 4 of the 4-layer backbones), the "
                  "cheapest pmi point of benchmarks/synthesis_front.py; never below --inversion_start_block."},
    )
    images_per_class: int = field(default=60, metadata={"help": "Training images per class (tasks learned from images)."})
    test_images_per_class: int = field(default=30, metadata={"help": "Test images per class."})
    from_checkpoint: str | None = field(
        default=None, metadata={"help": "Continue this checkpoint (folder or Hub repo id) with --add_names instead."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of --from_checkpoint (e.g. task-4)."})
    add_names: list[str] = field(default_factory=list, metadata={"help": "Class names to add to --from_checkpoint."})


def main(argv=None):
    script, names_config, args, method_config = parse_run_args(argv, parts=(ShapesArguments, NamesOnlyConfig),
                                                              defaults=DEFAULTS)
    if not 0 <= script.names_only_last < script.num_tasks:
        raise ValueError(f"--names_only_last must be between 0 and --num_tasks - 1 ({script.num_tasks - 1}): the first "
                         f"task needs images to project names from; got {script.names_only_last}.")
    processor = build_processor()
    if script.from_checkpoint:
        if not script.add_names:
            raise ValueError("--from_checkpoint continues a checkpoint with new class names: give --add_names.")
        trainer = ContinualTrainer.from_pretrained(
            script.from_checkpoint, tasks=names_only_tasks(script.add_names, config=names_config), args=args,
            revision=script.revision, method_config=method_config)
    else:
        data = load_shapes_dataset(per_class=script.images_per_class, test_per_class=script.test_images_per_class)
        tasks = split_class_incremental(data, num_tasks=script.num_tasks, seed=args.seed)
        if script.names_only_last:
            tasks = make_names_only(tasks, range(-script.names_only_last, 0), names_config)
        clip = shapes_clip(script.backbone_dir, steps=script.pretrain_steps)  # pre-training (first use) seeds itself
        lora = LoraConfig(r=script.lora_r, lora_alpha=2 * script.lora_r,
                          target_modules=r".*vision_model.*\.(q_proj|v_proj|fc1|fc2)", modules_to_save=["text_projection"],
                          exclude_modules=layers_below_pattern(
                              lora_block(script.lora_from_block, method_config, clip.config.vision_config.num_hidden_layers)))
        set_seed(args.seed)  # LoRA weights are drawn in from_clip, before the Trainer seeds anything
        model = ContinualCLIP.from_clip(clip, templates=SHAPES_TEMPLATES, lora=lora)
        trainer = ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=processor,
                                   method_config=method_config)
    result = trainer.train()
    if trainer.is_world_process_zero():
        print(f"\n{args.method} (seed {args.seed}), accuracy (%) after task i on task j:\n{result.table()}")
        print(f"A_last {result.a_last}  -> {args.output_dir}/results.json")


if __name__ == "__main__":
    main()
