"""A first run explains itself: no avoidable warnings (pinned memory on CPU, peft's deprecation noise)."""

import warnings

import torch
from peft import LoraConfig

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi.testing import build_clip


def test_a_lora_run_on_cpu_warns_about_nothing_avoidable(tmp_path, digits, processor):
    args = ContinualConfig(output_dir=str(tmp_path / "out"), method="finetune", max_steps=1, per_device_train_batch_size=16,
                           disable_tqdm=True)
    assert args.dataloader_pin_memory is torch.cuda.is_available()  # pinned memory only with an accelerator
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ContinualCLIP.from_clip(build_clip("tiny"), lora=LoraConfig(r=2, modules_to_save=["text_projection"]))
        ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=processor).train()
        ContinualCLIP.from_pretrained(tmp_path / "out" / "task-1")
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "pin_memory" in m or "is_gradient_checkpointing" in m], messages
