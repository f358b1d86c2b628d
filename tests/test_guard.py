"""The divergence guard: a blown-up run stops with an error naming task and step, and never saves NaN weights."""

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi.guard import DivergenceError
from hf_pmi.methods import METHODS, ContinualMethod, register_method
from hf_pmi.testing import build_clip


def make_args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "out"), method="finetune", max_steps=6, per_device_train_batch_size=16, warmup_steps=0,
                    disable_tqdm=True, logging_steps=100, seed=0, report_to="none")
    defaults.update(kw)
    return ContinualConfig(**defaults)


def saved_weights_are_finite(out) -> bool:
    for root, _, files in os.walk(out):
        for name in files:
            if name.endswith(".safetensors"):
                for tensor in load_file(os.path.join(root, name)).values():
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        return False
    return True


if "finetune_one_nan_pixel" not in METHODS:
    @register_method("finetune_one_nan_pixel")
    class FinetuneOneNanPixel(ContinualMethod):
        """Plain fine-tuning whose 3rd batch of task 1 carries one NaN pixel (a corrupt input)."""

        calls = 0

        def compute_loss(self, model, inputs, num_items_in_batch=None):
            if self.trainer.current_task == 1:
                self.calls += 1
                if self.calls == 3:
                    inputs["pixel_values"][0, 0, 0, 0] = float("nan")
            return super().compute_loss(model, inputs, num_items_in_batch)


def test_huge_learning_rate_stops_with_a_clear_error(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    trainer = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")),
                               args=make_args(tmp_path, learning_rate=1e6), tasks=tasks, processing_class=processor)
    with pytest.raises(DivergenceError, match=r"Training diverged in task 0 at step \d+: the loss is nan.*lower "
                                              r"learning rate.*check the inputs"):
        trainer.train()
    assert not os.path.exists(tmp_path / "out" / "task-0") and not os.path.exists(tmp_path / "out" / "results.json")


def test_one_nan_pixel_stops_the_run_and_keeps_earlier_checkpoints_finite(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    trainer = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")),
                               args=make_args(tmp_path, method="finetune_one_nan_pixel"), tasks=tasks,
                               processing_class=processor)
    with pytest.raises(DivergenceError, match=r"in task 1 at step 3: the loss is nan"):
        trainer.train()
    out = tmp_path / "out"
    assert sorted(p for p in os.listdir(out) if p.startswith("task-")) == ["task-0"]  # task 1 never saved
    assert saved_weights_are_finite(out)


class PoisonFrozenWeight(TrainerCallback):
    """Puts a NaN into a weight no optimizer touches (the patch embedding), as a bad load or kernel could."""

    def on_task_begin(self, args, state, control, task_id, trainer, **kw):
        if task_id == 1:
            with torch.no_grad():
                trainer.model.blocks.embeddings.patch_embedding.weight[0, 0, 0, 0] = float("nan")


def test_no_checkpoint_with_non_finite_weights_is_written(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    trainer = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=make_args(tmp_path, method="zero_shot"),
                               tasks=tasks, processing_class=processor, callbacks=[PoisonFrozenWeight()])
    with pytest.raises(DivergenceError, match=r"task 1 \(before saving its checkpoint\): non-finite weights in "
                                              r"clip.vision_model.embeddings.patch_embedding.weight"):
        trainer.train()
    out = tmp_path / "out"
    assert sorted(p for p in os.listdir(out) if p.startswith("task-")) == ["task-0"]
    assert saved_weights_are_finite(out)
