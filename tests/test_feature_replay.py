"""`feature_replay` is classifier-only replay: its replay term trains the text side, never the vision tower,
and each task reports how far the vision features drifted."""

import dataclasses

import torch
from peft import LoraConfig

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi.methods.feature_replay import feature_drift
from hf_pmi.testing import build_clip


def test_replay_gradient_reaches_the_text_side_only_and_drift_is_reported(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=5, seed=0)
    tasks = dataclasses.replace(tasks, tasks=tasks.tasks[:2])
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*vision_model.*\.(q_proj|v_proj)",
                      modules_to_save=["text_projection"])
    torch.manual_seed(0)
    args = ContinualConfig(output_dir=str(tmp_path / "fr"), method="feature_replay", max_steps=3,
                           per_device_train_batch_size=16, warmup_steps=0, disable_tqdm=True, logging_steps=100)
    trainer = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny"), lora=lora), args=args, tasks=tasks,
                               processing_class=processor)
    result = trainer.train()
    drift = [log["feature_drift"] for log in result.method_logs]
    assert all(d > 0 for d in drift), drift  # the LoRA tower moved in both tasks
    method, model = trainer.method, trainer.accelerator.unwrap_model(trainer.model).train()
    method.before_task(1)  # the replay of task 1: old classes are task 0's
    pixels = next(method.real_batches(tasks[1].train))[0]
    out = model(pixel_values=pixels)
    replay = method.replay_loss(out)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(replay, [p for _, p in named], allow_unused=True)
    norm = lambda part: sum(float(g.norm()) for (n, _), g in zip(named, grads) if g is not None and part(n))  # noqa: E731
    assert any("vision" in n for n, _ in named) and any("text_projection" in n for n, _ in named)
    assert norm(lambda n: "vision" in n) == 0.0  # replayed features enter after the vision tower
    assert norm(lambda n: "text_projection" in n) > 0
    method.num_old = 0  # the first task replays nothing
    assert method.replay_loss(out) is None


def test_feature_drift_is_one_minus_the_mean_cosine():
    a = torch.eye(4)
    assert feature_drift({0: a}, {0: a * 3}) == 0.0
    assert abs(feature_drift({0: a[:2], 1: a[2:]}, {0: a[2:], 1: a[2:]}) - 0.5) < 1e-6
