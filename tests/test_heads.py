"""Classifier heads (`hf_pmi.heads`): exact under class-incremental order, bit-exact through a checkpoint,
kept by resume, used for predictions, refused where they cannot work (names-only classes)."""

import json
import os

import pytest
import torch
from datasets import Value
from transformers import TrainerCallback

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi.heads import HEADS, RIDGE_GRID, RanPACHead, build_head
from hf_pmi.testing import build_clip, build_processor, build_tokenizer, load_digits_dataset


def blobs(n_per_class=40, classes=6, dim=8, seed=0):
    """Gaussian blobs: (features, labels) with well separated class means."""
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(classes, dim, generator=g)
    x = torch.cat([centres[c] + torch.randn(n_per_class, dim, generator=g) for c in range(classes)])
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return x, y


@pytest.mark.parametrize("name", sorted(HEADS))
def test_task_by_task_statistics_equal_one_fit_on_the_union(name):
    x, y = blobs()
    incremental, union = build_head(name, 8, projection_dim=64), build_head(name, 8, projection_dim=64)
    for task in range(3):  # 3 tasks of 2 classes
        keep = (y >= 2 * task) & (y < 2 * task + 2)
        incremental.update(x[keep], y[keep])
    union.update(x, y)
    for key, value in union.state_dict().items():
        if key != "ridge" and not key.startswith("val_"):  # the hold-out: a 20 % split of each update's data
            torch.testing.assert_close(incremental.state_dict()[key], value, rtol=1e-12, atol=1e-9)
    assert (incremental(x).argmax(-1) == y).float().mean() > 0.9  # separable blobs, chance 1/6


def test_ranpac_chooses_its_ridge_on_held_out_data():
    x, y = blobs(dim=8)
    clean = RanPACHead(8, projection_dim=256)
    clean.update(x, y)
    noisy = RanPACHead(8, projection_dim=256)  # labels that the features do not predict: a strong ridge wins
    noisy.update(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))])
    assert float(noisy.ridge) > float(clean.ridge)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranpac_seen_ridge_is_the_best_on_the_hold_out_of_every_task(seed):
    """The 'seen' choice, made from statistics only, is the ridge a fit on the samples themselves picks: fit on
    every task's 80 %, least squared error on every task's 20 %."""
    x, y = blobs(n_per_class=30, classes=6, seed=seed)
    y = torch.where(torch.rand(len(y), generator=torch.Generator().manual_seed(seed)) < 0.3, (y + 1) % 6, y)  # noise
    head = RanPACHead(8, projection_dim=48, seed=seed)
    fit, val = [], []
    for task in range(3):
        keep = torch.nonzero((y >= 2 * task) & (y < 2 * task + 2)).squeeze(1)
        head.update(x[keep], y[keep])
        v, f = head._holdout(len(keep))
        val.append(keep[v])
        fit.append(keep[f])
    fit, val = torch.cat(fit), torch.cat(val)
    h = head.project(x).double()
    y1 = torch.nn.functional.one_hot(y, 6).double()
    errors = []
    for r in RIDGE_GRID:
        w = torch.linalg.solve(h[fit].t() @ h[fit] + r * torch.eye(48, dtype=torch.float64), h[fit].t() @ y1[fit])
        errors.append((h[val] @ w - y1[val]).pow(2).sum().item())
    assert float(head.ridge) == RIDGE_GRID[min(range(len(errors)), key=errors.__getitem__)]
    task = RanPACHead(8, projection_dim=48, seed=seed, ridge_choice="task")  # RanPAC's: the last task's data only
    task.update(x[(y >= 4)], y[(y >= 4)])
    assert "val_gram" not in task.state_dict() and task.settings()["ridge_choice"] == "task"


@pytest.mark.parametrize("name", sorted(HEADS))
def test_drift_compensation_moves_a_class_with_its_samples(name):
    x, y = blobs()
    moved = x + 3.0 * (y == 1).float()[:, None]  # class 1 moves, the others stay
    head, reference = build_head(name, 8, projection_dim=128), build_head(name, 8, projection_dim=128)
    head.update(x, y)
    stale = head.val_targets.clone() if name == "ranpac" else None
    head.shift_classes(x[y == 1], moved[y == 1], y[y == 1])  # every sample of class 1, through both "models"
    reference.update(moved, y)
    # the class's mean (projected) feature lands exactly where a fit on the moved samples puts it
    means = {"ncm": "sums", "ranpac": "targets"}[name]
    torch.testing.assert_close(getattr(head, means), getattr(reference, means), rtol=1e-5, atol=1e-5)  # float32 projection
    if name == "ranpac":  # the hold-out's share (a subset of the class) moves by the class's mean displacement
        assert (head.val_targets - reference.val_targets).norm() < 0.5 * (stale - reference.val_targets).norm()
    assert (head(moved).argmax(-1) == y).float().mean() >= (reference(moved).argmax(-1) == y).float().mean() - 0.02


def test_head_round_trip_is_bit_exact_and_predicts(tmp_path):
    model = ContinualCLIP.from_clip(build_clip("tiny"), class_names=["a", "b", "c"], tokenizer=build_tokenizer())
    model.set_head(build_head("ranpac", model.feature_dim, projection_dim=100, seed=3))
    pixels = torch.randn(12, 3, 32, 32)
    model.eval()
    model.head.update(model.pooled_features(pixels), torch.arange(3).repeat(4))
    before = model(pixel_values=pixels)
    model.save_pretrained(tmp_path)
    loaded = ContinualCLIP.from_pretrained(tmp_path).eval()
    assert loaded.head_name == "ranpac"
    for key, value in model.head.state_dict().items():
        assert torch.equal(loaded.head.state_dict()[key], value), key
    after = loaded(pixel_values=pixels)
    assert torch.equal(after.head_logits, before.head_logits)
    assert torch.equal(after.prediction_logits, before.head_logits)  # predictions come from the head
    assert json.loads((tmp_path / "head" / "head.json").read_text())["settings"]["projection_dim"] == 100
    assert "head/head.safetensors" in json.loads((tmp_path / "continual_clip.json").read_text())["checksums"]


def test_a_head_without_a_class_refuses_to_score_it():
    model = ContinualCLIP.from_clip(build_clip("tiny"), class_names=["a", "b"], tokenizer=build_tokenizer()).eval()
    model.set_head(build_head("ncm", model.feature_dim))
    model.head.update(torch.randn(3, model.feature_dim), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match=r"no statistics for classes \[1\]"):
        model(pixel_values=torch.randn(1, 3, 32, 32))


def digits_run(tmp_path, method, **kw):
    tasks = split_class_incremental(load_digits_dataset(), num_tasks=3, seed=0)
    args = ContinualConfig(output_dir=str(tmp_path), method=method, disable_tqdm=True, max_steps=2,
                           per_device_train_batch_size=16, per_device_eval_batch_size=256, overwrite_output_dir=True,
                           head_projection_dim=500, **kw)
    torch.manual_seed(0)
    model = ContinualCLIP.from_clip(build_clip("tiny", seed=0))
    return ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=build_processor())


def write_image_folder(data, root):
    """A dataset dict as <root>/<split>/<class name>/<i>.png (what `--data_dir` reads)."""
    for split, ds in data.items():
        names = ds.features["label"].names
        for i, row in enumerate(ds):
            folder = root / split / names[row["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            row["image"].save(folder / f"{i}.png")


def test_ranpac_method_learns_digits_without_training_and_eval_reproduces_it(tmp_path):
    """The frozen-backbone baseline: no step, A_last far above chance (0.1) even on a random tiny CLIP, and
    `hf-pmi eval` of the saved checkpoint scores the test set as the run did (its predictions use the head)."""
    from hf_pmi.cli import main

    result = digits_run(tmp_path, "ranpac").train()
    assert result.a_last > 0.5
    saved = ContinualCLIP.from_pretrained(tmp_path / "task-2").clip.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in build_clip("tiny", seed=0).state_dict().items())  # no step
    write_image_folder(load_digits_dataset(), tmp_path / "images")
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "task-2"), "--data_dir", str(tmp_path / "images"),
                 "--output_file", str(out)]) in (0, None)
    scores = json.loads(out.read_text())
    assert scores["accuracy"] == pytest.approx(result.a_last, abs=1e-9)
    assert ContinualCLIP.from_pretrained(tmp_path / "task-2").head_name == "ranpac"


def test_resume_keeps_the_head(tmp_path):
    full = digits_run(tmp_path / "full", "finetune", head="ncm").train()
    partial_dir = tmp_path / "partial"
    digits_run(partial_dir, "finetune", head="ncm").train()
    import shutil

    shutil.rmtree(partial_dir / "task-2")  # as if killed during the last task
    resumed = digits_run(partial_dir, "finetune", head="ncm").train(resume_from_checkpoint=True)
    assert resumed.accuracy_matrix == full.accuracy_matrix
    a = ContinualCLIP.from_pretrained(tmp_path / "full" / "task-2").head.state_dict()
    b = ContinualCLIP.from_pretrained(partial_dir / "task-2").head.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_head_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="Unknown head 'ridge'"):
        ContinualConfig(output_dir=str(tmp_path), head="ridge")
    trainer = digits_run(tmp_path / "run", "finetune", head="ncm")
    trainer.train()
    # a continued ncm checkpoint with another head: its old classes have no statistics for it
    data = load_digits_dataset().cast_column("label", Value("int64"))  # new names: refused before they are used
    new = split_class_incremental(data, num_tasks=3, seed=0, class_names=[f"digit {i}" for i in range(10)])
    args = ContinualConfig(output_dir=str(tmp_path / "more"), method="finetune", head="ranpac", max_steps=1)
    with pytest.raises(ValueError, match="predicts with the ncm head"):
        ContinualTrainer.from_pretrained(str(tmp_path / "run" / "task-2"), tasks=new, args=args)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_names_only_classes_need_the_text_head(tmp_path, name):
    from peft import LoraConfig

    model = ContinualCLIP.from_clip(build_clip("tiny"), class_names=["a", "b"], tokenizer=build_tokenizer(),
                                    lora=LoraConfig(r=2))
    model.route_classes([1], torch.randn(1, model.clip_config.projection_dim))
    with pytest.raises(ValueError, match="head='text'"):
        model.set_head(build_head(name, model.feature_dim))
    model.save_pretrained(tmp_path / "ckpt")
    build_processor().save_pretrained(tmp_path / "ckpt")
    state = {"task_id": 0, "num_tasks": 1, "method": "pmi", "seed": 0, "task_classes": [[0, 1]],
             "accuracy_matrix": [[1.0]], "counts": [2]}
    (tmp_path / "ckpt" / "continual_state.json").write_text(json.dumps(state))
    args = ContinualConfig(output_dir=str(tmp_path / "out"), method="pmi", head=name, max_steps=1)
    with pytest.raises(ValueError, match="head='text'"):
        ContinualTrainer.from_pretrained(str(tmp_path / "ckpt"), tasks=["purple ring"], args=args)


def test_aper_adapts_on_the_first_task_only(tmp_path):
    from peft import LoraConfig

    tasks = split_class_incremental(load_digits_dataset(), num_tasks=2, seed=0)
    args = ContinualConfig(output_dir=str(tmp_path), method="aper", disable_tqdm=True, max_steps=2,
                           per_device_train_batch_size=16, per_device_eval_batch_size=256, head_projection_dim=300)
    torch.manual_seed(0)
    model = ContinualCLIP.from_clip(build_clip("tiny", seed=0), lora=LoraConfig(r=2))
    before = {k: v.clone() for k, v in model.clip.state_dict().items() if "lora_B" in k}
    ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=build_processor()).train()
    task0 = ContinualCLIP.from_pretrained(tmp_path / "task-0").clip.state_dict()
    task1 = ContinualCLIP.from_pretrained(tmp_path / "task-1")
    assert any(not torch.equal(task0[k], v) for k, v in before.items())  # the first task adapts
    assert all(torch.equal(task0[k], v) for k, v in task1.clip.state_dict().items())  # then frozen
    assert task1.head_name == "ranpac"


def test_feature_distillation_keeps_old_features_in_place(tmp_path):
    """LwF with a strong feature distillation (`--lwf_l_fd`) moves the first task's pooled features less."""
    from hf_pmi.methods.lwf import LwFConfig

    tasks = split_class_incremental(load_digits_dataset(), num_tasks=2, seed=0)
    pixels = torch.stack([build_processor().image_processor(images=tasks[0].train[i]["image"],
                                                            return_tensors="pt")["pixel_values"][0] for i in range(32)])
    drift = {}
    for l_fd in (0.0, 1000.0):
        out = tmp_path / str(l_fd)
        args = ContinualConfig(output_dir=str(out), method="lwf", disable_tqdm=True, max_steps=6, learning_rate=1e-2,
                               per_device_train_batch_size=16, per_device_eval_batch_size=256, head="ncm")
        torch.manual_seed(0)
        model = ContinualCLIP.from_clip(build_clip("tiny", seed=0))
        ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=build_processor(),
                         method_config=LwFConfig(l_fd=l_fd)).train()
        a, b = (ContinualCLIP.from_pretrained(out / f"task-{t}").eval().pooled_features(pixels) for t in (0, 1))
        drift[l_fd] = (a - b).pow(2).mean().item()
    assert drift[1000.0] < 0.5 * drift[0.0]


def test_later_learning_rate_applies_to_the_tasks_that_replay(tmp_path):
    """``replay.later_lr_scale``: the first task trains at --learning_rate, the tasks that replay at that times the
    scale (the learning rates the Trainer logged)."""
    from hf_pmi.methods.exemplar_replay import ExemplarReplayConfig
    from hf_pmi.replay import ReplayConfig

    with pytest.raises(ValueError, match="replay_later_lr_scale"):
        ReplayConfig(later_lr_scale=0.0)
    tasks = split_class_incremental(load_digits_dataset(), num_tasks=2, seed=0)
    args = ContinualConfig(output_dir=str(tmp_path), method="exemplar_replay", disable_tqdm=True, max_steps=3,
                           warmup_steps=0, lr_scheduler_type="constant", logging_steps=1, learning_rate=1e-2,
                           per_device_train_batch_size=16, per_device_eval_batch_size=256)
    config = ExemplarReplayConfig(replay=ReplayConfig(later_lr_scale=1e-3, batch_size=4))
    rates = []

    class Rates(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "learning_rate" in logs:
                rates.append(logs["learning_rate"])

    trainer = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny", seed=0)), args=args, tasks=tasks,
                               processing_class=build_processor(), method_config=config, callbacks=[Rates()])
    trainer.train()
    assert rates[:3] == [1e-2] * 3 and rates[3:] == pytest.approx([1e-5] * 3)
    assert trainer.args.learning_rate == 1e-2  # restored after the task


def test_joint_refits_its_head_on_every_seen_image(tmp_path):
    """joint keeps all seen images, so its head after the last task is one fit on all of them through the final
    model (the upper bound for a head on those features), not statistics of older models."""
    from transformers import AutoProcessor

    from hf_pmi.data import ContinualCollator

    trainer = digits_run(tmp_path, "joint", head="ncm")
    trainer.train()
    final = ContinualCLIP.from_pretrained(tmp_path / "task-2").eval()
    collate = ContinualCollator(AutoProcessor.from_pretrained(tmp_path / "task-2").image_processor,
                                trainer.tasks.label_map)
    fit = build_head("ncm", final.feature_dim)
    for task in trainer.tasks:
        batch = collate([task.train[i] for i in range(len(task.train))])
        fit.update(final.pooled_features(batch["pixel_values"]), batch["labels"])
    torch.testing.assert_close(final.head.sums, fit.sums, rtol=1e-5, atol=1e-4)  # float32 features, batched
    assert torch.equal(final.head.counts, fit.counts)
