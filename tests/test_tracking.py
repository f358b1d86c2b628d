"""One tracker run per task sequence: a growing global step, per-task continual metrics, logging."""

import glob
import json
import logging
import os

import pytest

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, split_class_incremental
from hf_pmi.testing import build_clip


def read_scalars(path):
    """(step, tag, value) of every scalar in one event file, in file order."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    out = []
    for event in LegacyEventFileLoader(path).Load():
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.append((event.step, value.tag, value.simple_value))
    return out


def test_three_tasks_are_one_tensorboard_run_with_growing_steps(tmp_path, digits, processor, capsys):
    pytest.importorskip("tensorboard")
    tasks = split_class_incremental(digits, num_tasks=3, seed=0)
    out = tmp_path / "out"
    args = ContinualConfig(output_dir=str(out), method="finetune", max_steps=4, per_device_train_batch_size=16, warmup_steps=0,
                           logging_steps=2, report_to=["tensorboard"], seed=0, disable_tqdm=False)
    trainer = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=args, tasks=tasks,
                               processing_class=processor)
    result = trainer.train()

    files = glob.glob(str(out / "runs" / "*" / "events.out.tfevents.*"))
    assert len(files) == 1, files  # one run, not one event file per task
    scalars = read_scalars(files[0])
    loss_steps = [step for step, tag, _ in scalars if tag == "train/loss"]
    assert loss_steps == [2, 4, 6, 8, 10, 12]  # 3 tasks x 4 steps, logged every 2: the step keeps growing
    for tag in {tag for _, tag, _ in scalars}:
        steps = [step for step, t, _ in scalars if t == tag]
        assert steps == sorted(set(steps)), (tag, steps)  # strictly increasing per series
    all_steps = [step for step, _, _ in scalars]
    assert all_steps == sorted(all_steps)  # and never back in time across series

    def series(tag):
        return {step: value for step, t, value in scalars if t == tag}

    assert series("eval/task") == {4: 0.0, 8: 1.0, 12: 2.0}
    a_last = series("eval/a_last")
    assert list(a_last) == [4, 8, 12]
    assert a_last[12] == pytest.approx(result.a_last) and series("eval/a_avg")[12] == pytest.approx(result.a_avg)
    assert series("eval/forgetting")[12] == pytest.approx(result.forgetting)
    assert series("eval/accuracy_task_0")[12] == pytest.approx(result.accuracy_matrix[2][0])
    assert list(series("eval/accuracy_task_2")) == [12]  # the row of task 2 only exists after task 2
    assert series("eval/new_class_accuracy")[12] == pytest.approx(result.new_class_accuracy[-1])
    assert list(series("eval/old_class_accuracy")) == [8, 12]  # no old classes after task 0

    saved = json.loads((out / "eval_results.json").read_text())  # save_metrics of the latest task
    assert saved["eval_task"] == 2 and saved["eval_a_last"] == pytest.approx(result.a_last)
    state = json.loads((out / "task-2" / "continual_state.json").read_text())
    assert state["global_step"] == 12
    printed = capsys.readouterr().out
    assert printed.count("[hf_pmi] task ") == 3 and "task 2/2 (10 classes seen)" in printed  # with progress bars on


def test_log_level_reaches_the_library_logger(tmp_path, digits, processor, caplog):
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    common = dict(output_dir=str(tmp_path / "out"), method="finetune", max_steps=1, per_device_train_batch_size=16, disable_tqdm=True)
    ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")), args=ContinualConfig(**common),
                     tasks=tasks, processing_class=processor).train()
    os.remove(tmp_path / "out" / "task-1" / "continual_state.json")  # task 1 unfinished: resume after task 0

    quiet = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")),
                             args=ContinualConfig(**common, log_level="warning"), tasks=tasks,
                             processing_class=processor)
    assert not logging.getLogger("hf_pmi").isEnabledFor(logging.INFO)
    trainer = ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny")),
                               args=ContinualConfig(**common, log_level="info"), tasks=tasks,
                               processing_class=processor)
    assert logging.getLogger("hf_pmi").isEnabledFor(logging.INFO) and quiet is not trainer
    with caplog.at_level(logging.INFO):  # root level only: the hf_pmi level is the trainer's
        trainer.train(resume_from_checkpoint=True)
    assert "Resumed from" in caplog.text and "task 0 finished" in caplog.text
    from transformers.utils import logging as hf_logging

    from hf_pmi.log import set_verbosity

    set_verbosity("warning")  # leave the defaults for the other tests (log_level sets them process-wide)
    hf_logging.set_verbosity_warning()
