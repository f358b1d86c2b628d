import json

import pytest
import torch
from transformers import TrainerCallback

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi.testing import build_clip

RESULT_KEYS = {"method", "seed", "class_order", "class_names", "accuracy_matrix", "a_last", "a_avg", "forgetting",
               "bwt", "wall_seconds"}


def make_args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "out"), method="finetune", max_steps=4, per_device_train_batch_size=32,
                    warmup_steps=0, disable_tqdm=True, logging_steps=100, seed=0)
    defaults.update(kw)
    return ContinualConfig(**defaults)


class Recorder(TrainerCallback):
    """Records task events and the model's logits on a fixed batch at the end of every task."""

    def __init__(self, x):
        self.x, self.events, self.logits = x, [], []

    def on_task_begin(self, args, state, control, task_id, **kw):
        self.events.append(("begin", task_id))

    def on_task_end(self, args, state, control, task_id, trainer, result, **kw):
        self.events.append(("end", task_id))
        with torch.no_grad():
            self.logits.append(trainer.model.eval()(pixel_values=self.x).logits.clone())


def test_two_tasks_write_checkpoints_that_reload_with_identical_logits(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    x = torch.rand(4, 3, 32, 32)
    recorder = Recorder(x)
    trainer = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=make_args(tmp_path),
                               tasks=tasks, processing_class=processor, callbacks=[recorder])
    result = trainer.train()
    assert recorder.events == [("begin", 0), ("end", 0), ("begin", 1), ("end", 1)]
    assert len(result.accuracy_matrix) == 2 and result.accuracy_matrix[0][1] is None
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert RESULT_KEYS <= set(saved) and saved["accuracy_matrix"] == result.accuracy_matrix
    for t in range(2):
        folder = tmp_path / "out" / f"task-{t}"
        state = json.loads((folder / "continual_state.json").read_text())
        assert state["task_id"] == t and len(state["accuracy_matrix"]) == t + 1
        model = ContinualCLIP.from_pretrained(folder).eval()
        assert model.num_classes == 5 * (t + 1)
        assert torch.equal(model(pixel_values=x).logits, recorder.logits[t])


def test_learns_above_chance_and_finetune_forgets(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, initial_classes=2, classes_per_task=8, seed=0)
    # a random text tower trained whole pulls the class prompts together (a plateau that the run escaped
    # or not depending on the thread count): as in the digits recipe, only its projection trains.
    # Measured: task-0 accuracy 0.97 with lr 3e-3 (0.72 with 1e-2).
    clip = build_clip("tiny")
    clip.text_model.requires_grad_(False)
    args = make_args(tmp_path, max_steps=-1, num_train_epochs=6, learning_rate=3e-3, lr_scheduler_type="constant")
    result = ContinualTrainer(model=ContinualCLIP.from_clip(clip), args=args, tasks=tasks,
                              processing_class=processor).train()
    assert result.accuracy_matrix[0][0] > 0.8  # 2 classes: chance is 0.5
    assert result.forgetting > 0.2  # plain fine-tuning overwrites task 0


class Crash(TrainerCallback):
    def on_task_end(self, args, state, control, task_id, **kw):
        if task_id == 0:
            raise KeyboardInterrupt("simulated crash after task 0")


def test_resume_continues_after_the_last_finished_task(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=3, seed=0)
    args = make_args(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=args, tasks=tasks,
                         processing_class=processor, callbacks=[Crash()]).train()
    first = (tmp_path / "out" / "task-0" / "clip" / "model.safetensors").read_bytes()
    recorder = Recorder(torch.rand(1, 3, 32, 32))
    trainer = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny", seed=5)), args=args, tasks=tasks,
                               processing_class=processor, callbacks=[recorder])
    result = trainer.train(resume_from_checkpoint=True)
    assert recorder.events == [("begin", 1), ("end", 1), ("begin", 2), ("end", 2)]
    assert len(result.accuracy_matrix) == 3
    assert (tmp_path / "out" / "task-0" / "clip" / "model.safetensors").read_bytes() == first


def test_unknown_method_is_refused_before_training(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=2)
    with pytest.raises(ValueError, match="Unknown method 'nope'.*finetune"):
        ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=make_args(tmp_path, method="nope"),
                         tasks=tasks, processing_class=processor)
    assert not (tmp_path / "task-0").exists()


def test_a_bare_clip_model_is_refused_naming_both_families(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=2)
    with pytest.raises(TypeError, match=r"must be a ContinualCLIP \(wrap a CLIPModel with `ContinualCLIP.from_clip"
                                        r"\(clip\)`\) or an image classifier whose head can grow.*got CLIPModel"):
        ContinualTrainer(model=build_clip("tiny"), args=make_args(tmp_path), tasks=tasks, processing_class=processor)


def test_streaming_tasks_need_max_steps(tmp_path, digits, processor):
    tasks = split_class_incremental(digits["train"].to_iterable_dataset(), num_tasks=2)
    with pytest.raises(ValueError, match="max_steps"):
        ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=make_args(tmp_path, max_steps=-1),
                         tasks=tasks, processing_class=processor)


def test_streaming_run_trains(tmp_path, digits, processor):
    from datasets import IterableDatasetDict

    stream = IterableDatasetDict({k: v.to_iterable_dataset() for k, v in digits.items()})
    tasks = split_class_incremental(stream, num_tasks=2)
    result = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=make_args(tmp_path),
                              tasks=tasks, processing_class=processor).train()
    assert len(result.accuracy_matrix) == 2 and result.counts[0] > 0
