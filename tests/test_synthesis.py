"""Replay synthesis: each class inverted once and kept, batches shuffled across classes, replay at a
block above the patch maps (only the layers that change are inverted), and the buffer in the checkpoint."""

import dataclasses

import pytest
import torch
from configs import fast_pmi
from peft import LoraConfig

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi.bank import FeatureBank, SamplingConfig
from hf_pmi.blocks import VisionBlocks, layers_below_pattern
from hf_pmi.inversion import InversionConfig, invert
from hf_pmi.seeding import rank_seed
from hf_pmi.statistics import collect_layer_statistics
from hf_pmi.synthesis import BUFFER_NAME, BufferConfig, inversion_batches, load_buffer, synthesize_replay
from hf_pmi.testing import build_clip

FAST = dict(layer_steps=3, first_block_steps=4, upsample_at=(1, 2, 3), refine_steps=3)


def args(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), method="pmi", max_steps=2, per_device_train_batch_size=16,
                warmup_steps=0, disable_tqdm=True, logging_steps=100, seed=0)
    return ContinualConfig(**{**base, **kw})


def lora_model(block=1):
    torch.manual_seed(0)  # LoRA weights are drawn before the Trainer seeds anything
    return ContinualCLIP.from_clip(build_clip("tiny"), lora=LoraConfig(r=4, lora_alpha=8,
                                                                       exclude_modules=layers_below_pattern(block)))


def test_each_class_is_inverted_once_and_kept(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=3, seed=0)
    trainer = ContinualTrainer(model=lora_model(), args=args(tmp_path, "inc"), tasks=tasks, processing_class=processor,
                               method_config=fast_pmi())
    result = trainer.train()
    assert [log["inverted_classes"] for log in result.method_logs] == [len(t.class_ids) for t in tasks]
    samples, labels = trainer.method.buffer
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    # the samples of task 0's classes are those inverted after task 0: kept, not regenerated
    first = load_buffer(str(tmp_path / "inc" / "task-0" / BUFFER_NAME))
    n0 = 2 * len(tasks[0].class_ids)
    assert torch.equal(samples[:n0], first[0]) and first[3] == 1
    # today's behaviour stays available: every class inverted again after every task
    again = fast_pmi()
    again.buffer = BufferConfig(incremental=False)
    full = ContinualTrainer(model=lora_model(), args=args(tmp_path, "full"), tasks=tasks, processing_class=processor,
                            method_config=again).train()
    assert [log["inverted_classes"] for log in full.method_logs] == [4, 7, 10]


def test_shuffled_batches_mix_classes_and_samples_come_back_in_class_order():
    labels = torch.arange(4).repeat_interleave(5)
    batches = inversion_batches(labels, 8, seed=0)
    assert sorted(torch.cat(batches).tolist()) == list(range(20)) and [len(b) for b in batches] == [8, 8, 4]
    assert all(len(labels[b].unique()) > 1 for b in batches)  # every batch mixes classes
    assert [len(labels[b].unique()) for b in inversion_batches(labels, 5, seed=0, shuffle=False)] == [1, 1, 1, 1]
    assert all(torch.equal(a, b) for a, b in zip(batches, inversion_batches(labels, 8, seed=0)))  # seeded
    model = build_clip("tiny")
    bank = FeatureBank()
    g = torch.Generator().manual_seed(0)
    bank.add_classes(range(4), {c: torch.randn(10, 16, generator=g) + c for c in range(4)}, train_contrastive=False)
    bank.update_statistics(collect_layer_statistics(model, [torch.randn(8, 3, 32, 32, generator=g)]))
    config = InversionConfig(batch_size=8, seed=5, **FAST)
    x, y, targets, report = synthesize_replay(model, bank, range(4), config, SamplingConfig(per_class=5, selection="gaussian"),
                                              progress=False)
    assert y.tolist() == labels.tolist() and report["targets"] == 20
    order = torch.cat(inversion_batches(y, 8, seed=5))
    by_hand = invert(model, targets[order], bank.statistics, config, seed=rank_seed(5, 0), progress=False).samples
    assert torch.equal(x[order], by_hand)  # the inverted batches, put back in class order


def test_a_parameter_trainable_below_the_replay_block_is_refused_before_any_work(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    config = fast_pmi(start_block=3)  # tokens entering encoder layer 1 of the tiny CLIP's 2
    with pytest.raises(ValueError, match=r"Replay enters the vision tower at block 3.*exclude_modules="):
        ContinualTrainer(model=lora_model(block=1), args=args(tmp_path, "bad"), tasks=tasks,
                         processing_class=processor, method_config=config)  # LoRA on layer 0 too
    assert not (tmp_path / "bad" / "task-0").exists()
    with pytest.raises(ValueError, match="must be between 1"):
        ContinualTrainer(model=lora_model(), args=args(tmp_path, "post"), tasks=tasks, processing_class=processor,
                         method_config=fast_pmi(start_block=4))  # the post block is no place to replay
    ContinualTrainer(model=lora_model(block=3), args=args(tmp_path, "ok"), tasks=tasks, processing_class=processor,
                     method_config=config)  # LoRA from layer 1 on: accepted


def test_replay_at_a_deeper_block_runs_and_gives_the_teacher_logits_at_the_start_of_a_task(tmp_path, digits,
                                                                                          processor):
    tasks = split_class_incremental(digits, num_tasks=3, seed=0)
    trainer = ContinualTrainer(model=lora_model(block=3), args=args(tmp_path, "deep"), tasks=tasks,
                               processing_class=processor, method_config=fast_pmi(start_block=3))
    result = trainer.train()
    assert result.accuracy_matrix[2][0] is not None and result.method_logs[0]["inversion_full_model_passes"] > 0
    method, model = trainer.method, trainer.accelerator.unwrap_model(trainer.model).eval()
    samples, labels = method.buffer
    assert samples.shape == (20, 65, 32)  # tokens entering encoder layer 1 (65 tokens, width 32)
    teacher = method.snapshot_teacher()  # what the next task starts from
    with torch.no_grad():
        student = model(replay_inputs=samples, replay_block=3).replay_logits
        assert torch.equal(student, teacher(replay_inputs=samples, replay_block=3).replay_logits)
        pixels = torch.randn(4, 3, 32, 32)
        tokens = VisionBlocks(model).forward_from(0, pixels, end=3)  # real images, entered at block 3
        assert torch.equal(model(pixel_values=pixels).logits, model(replay_inputs=tokens, replay_block=3).replay_logits)
    # the checkpoint records the block; continuing it at another block is refused, naming the fix
    folder = tmp_path / "deep" / "task-2"
    assert load_buffer(str(folder / BUFFER_NAME))[3] == 3
    assert "| start_block | 3 |" in (folder / "README.md").read_text()
    new = dataclasses.replace(tasks, tasks=[dataclasses.replace(tasks[2], task_id=0, class_ids=[0, 1, 2])],
                              class_order=tasks.class_order[7:], class_names=tasks.class_names[7:])
    with pytest.raises(ValueError, match="--inversion_start_block 3"):
        ContinualTrainer.from_pretrained(str(tmp_path / "deep" / "task-1"), tasks=new, args=args(tmp_path, "cont"),
                                         method_config=fast_pmi(start_block=2))


def test_continuing_a_checkpoint_reuses_its_buffer_and_refresh_refines_the_kept_samples(tmp_path, digits, processor):
    tasks = split_class_incremental(digits, num_tasks=5, seed=0)
    old = dataclasses.replace(tasks, tasks=tasks.tasks[:2], class_order=tasks.class_order[:4],
                              class_names=tasks.class_names[:4])
    new = dataclasses.replace(tasks, tasks=[dataclasses.replace(tasks[2], task_id=0, class_ids=[0, 1])],
                              class_order=tasks.class_order[4:6], class_names=tasks.class_names[4:6])
    ContinualTrainer(model=lora_model(), args=args(tmp_path, "base"), tasks=old, processing_class=processor,
                     method_config=fast_pmi()).train()
    kept = load_buffer(str(tmp_path / "base" / "task-1" / BUFFER_NAME))
    config = fast_pmi()
    config.buffer = BufferConfig(refresh_steps=2)
    trainer = ContinualTrainer.from_pretrained(str(tmp_path / "base" / "task-1"), tasks=new,
                                               args=args(tmp_path, "cont"), method_config=config)
    assert torch.equal(trainer.method.buffer[0], kept[0])  # loaded, not inverted again
    result = trainer.train()
    assert result.method_logs[-1]["inverted_classes"] == 2  # the new task's classes only
    samples, labels = trainer.method.buffer
    assert labels.tolist() == [c for c in range(6) for _ in range(2)]
    assert not torch.equal(samples[:8], kept[0])  # the old samples were refined under the new model
