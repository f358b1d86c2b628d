"""CLIP ViT-B/16 on CUB-200, 10 tasks x 20 classes, the reference setup of the PMI paper.

    accelerate launch recipes/clip_cub200.py --output_dir runs/cub200-pmi
    accelerate launch recipes/clip_cub200.py --output_dir runs/cub200-pmi --push_to_hub --hub_model_id me/clip-cub200-pmi

Every default can be overridden; with a local model folder and a local image folder
(``<data_dir>/{train,test}/<class name>/*.png``) it runs offline:

    python recipes/clip_cub200.py --model_name_or_path path/to/clip --data_dir path/to/images --output_dir out

The default dataset id is a community upload of CUB-200-2011 with ``image`` / ``label`` columns and
``train`` / ``test`` splits; point ``--dataset_name`` at any dataset with the same shape.
"""

from dataclasses import dataclass, field

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoProcessor, HfArgumentParser, set_seed

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi.inversion import InversionConfig
from hf_pmi.modeling import DEFAULT_LORA_TARGETS
from hf_pmi.validation import check_local_path


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="openai/clip-vit-base-patch16", metadata={"help": "CLIP: Hub id or folder."})
    dataset_name: str | None = field(
        default="bentrevett/caltech-ucsd-birds-200-2011", metadata={"help": "Hub dataset (ignored with --data_dir)."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_dir: str | None = field(default=None, metadata={"help": "Local image folder (train/ and test/ subfolders)."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (then set --max_steps per task)."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    test_split: str = field(default="test", metadata={"help": "Test split."})
    image_column: str = field(default="image", metadata={"help": "Image column."})
    label_column: str = field(default="label", metadata={"help": "Label column (a ClassLabel)."})
    num_tasks: int = field(default=10, metadata={"help": "Number of equal tasks (reference: 10 x 20 classes)."})
    class_order_seed: int = field(default=1993, metadata={"help": "Seed of the class order (reference: 1993)."})
    template: str = field(default="a bad photo of a {}.", metadata={"help": "Prompt template (reference's)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank; 0 trains the whole model instead."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_target_modules: str = field(
        default=DEFAULT_LORA_TARGETS, metadata={"help": "Regex of modules to adapt (default: vision q/v proj)."}
    )


def main():
    parser = HfArgumentParser((ScriptArguments, ContinualConfig, InversionConfig))
    # CUB-specific reference values (method.md): 10 epochs, l_tkd 0.1, l_ft 0.1, alpha_rf 0.2, lr_rf 0.02.
    # CUB values of the reference (method.md): 10 epochs, l_tkd 0.1, l_ft 0.1, alpha_rf 0.2 (so the
    # per-layer weight a_layer = 0.2 * 15 blocks = 3.0), refinement lr 0.02.
    parser.set_defaults(method="pmi", num_train_epochs=10, l_tkd=0.1, l_ft=0.1, alpha_rf=0.2, a_layer=3.0, refine_lr=0.02)
    script, args, inversion = parser.parse_args_into_dataclasses()

    check_local_path(script.model_name_or_path, "CLIP model folder")
    if script.data_dir:
        check_local_path(script.data_dir, "image folder")
        data = load_dataset("imagefolder", data_dir=script.data_dir, streaming=script.streaming)
    else:
        data = load_dataset(script.dataset_name, script.dataset_config, streaming=script.streaming)
    tasks = split_class_incremental(
        data,
        num_tasks=script.num_tasks,
        seed=script.class_order_seed,
        image_column=script.image_column,
        label_column=script.label_column,
        train_split=script.train_split,
        test_split=script.test_split,
    )
    tasks.metadata["dataset"] = None if script.data_dir else script.dataset_name  # the Hub id, for the card
    processor = AutoProcessor.from_pretrained(script.model_name_or_path)
    lora = None
    if script.lora_r > 0:
        lora = LoraConfig(r=script.lora_r, lora_alpha=script.lora_alpha, target_modules=script.lora_target_modules)
    set_seed(args.seed)  # LoRA weights are drawn here, before the Trainer seeds anything
    model = ContinualCLIP.from_clip(script.model_name_or_path, templates=[script.template], lora=lora)
    trainer = ContinualTrainer(
        model=model, args=args, tasks=tasks, processing_class=processor, inversion_config=inversion
    )
    result = trainer.train()  # --resume_from_checkpoint true (or a task folder) continues an interrupted run
    if trainer.is_world_process_zero():
        print(f"\n{args.method}, accuracy (%) after task i on task j:\n{result.table()}")
        print(f"A_last {result.a_last:.4f}  A_avg {result.a_avg:.4f}  forgetting {result.forgetting:.4f}")


if __name__ == "__main__":
    main()
