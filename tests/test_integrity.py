"""Nothing corrupt loads silently: every loader verifies the recorded checksums, and a truncated or
half-written file fails with an error that names the file and the fix."""

import json
import shutil

import pytest
import torch
from configs import fast_pmi
from peft import LoraConfig

from hf_pmi import ContinualCLIP, ContinualConfig, ContinualTrainer, FeatureBank, split_class_incremental
from hf_pmi.integrity import CheckpointFileError, ChecksumError, weight_checksums
from hf_pmi.testing import build_clip


def flip_a_bit(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10  # a bit of a weight near the end of the file (the header stays valid)
    path.write_bytes(bytes(data))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def args_for(out, **kw):
    return ContinualConfig(output_dir=str(out), method="pmi", max_steps=2, per_device_train_batch_size=16,
                           warmup_steps=0, disable_tqdm=True, logging_steps=100, seed=0, **kw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits, processor):
    """A finished 2-task pmi run (LoRA, tiny CLIP): task-0 and task-1 with model, processor, bank and state."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    model = ContinualCLIP.from_clip(build_clip("tiny"), lora=LoraConfig(r=2))
    ContinualTrainer(model=model, args=args_for(out), tasks=tasks, processing_class=processor,
                     method_config=fast_pmi()).train()
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def test_a_flipped_bit_in_a_task_folder_fails_every_loader(run_copy, digits, processor):
    from hf_pmi.cli import EvalArguments, evaluate_checkpoint

    task = run_copy / "task-1"
    flip_a_bit(task / "clip" / "model.safetensors")
    with pytest.raises(ChecksumError, match=r"clip/model\.safetensors is corrupt.*Copy or download"):
        ContinualCLIP.from_pretrained(task)
    with pytest.raises(ChecksumError, match=r"clip/model\.safetensors is corrupt"):
        evaluate_checkpoint(EvalArguments(checkpoint=str(task)))  # hf-pmi eval
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    with pytest.raises(ChecksumError, match=r"clip/model\.safetensors"):
        ContinualTrainer(model=ContinualCLIP.from_clip(build_clip("tiny"), lora=LoraConfig(r=2)),
                         args=args_for(run_copy, resume_from_checkpoint=str(task)), tasks=tasks,
                         processing_class=processor, method_config=fast_pmi()).train()
    # the bank of a task folder, loaded on its own or by continuing the checkpoint
    flip_a_bit(run_copy / "task-0" / "feature_bank" / "feature_bank.safetensors")
    with pytest.raises(ChecksumError, match=r"feature_bank/feature_bank\.safetensors is corrupt"):
        FeatureBank.from_pretrained(run_copy / "task-0" / "feature_bank")
    with pytest.raises(ChecksumError, match=r"feature_bank\.safetensors is corrupt"):
        ContinualTrainer.from_pretrained(str(run_copy / "task-0"), tasks=["a new digit"],
                                         args=args_for(run_copy.parent / "continued"), method_config=fast_pmi())


def test_a_model_or_bank_saved_on_its_own_records_and_verifies_its_checksums(tmp_path, processor):
    model = ContinualCLIP.from_clip(build_clip("tiny"), ["cat", "dog"], processor.tokenizer, lora=LoraConfig(r=2))
    model.save_pretrained(tmp_path / "model")
    recorded = json.loads((tmp_path / "model" / "continual_clip.json").read_text())["checksums"]
    assert {"class_prompts.safetensors", "clip/model.safetensors", "clip/config.json", "base/model.safetensors",
            "adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= set(recorded)
    ContinualCLIP.from_pretrained(tmp_path / "model")  # intact: loads
    flip_a_bit(tmp_path / "model" / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ChecksumError, match=r"adapter_model\.safetensors is corrupt"):
        ContinualCLIP.from_pretrained(tmp_path / "model")

    bank = FeatureBank()
    bank.add_classes([0, 1], {0: torch.randn(8, 4), 1: torch.randn(8, 4)}, train_contrastive=False)
    bank.save_pretrained(tmp_path / "bank")
    assert FeatureBank.from_pretrained(tmp_path / "bank").num_classes == 2
    flip_a_bit(tmp_path / "bank" / "feature_bank.safetensors")
    with pytest.raises(ChecksumError, match=r"feature_bank\.safetensors is corrupt"):
        FeatureBank.from_pretrained(tmp_path / "bank")


@pytest.mark.parametrize("name", ["clip/model.safetensors", "feature_bank/feature_bank.safetensors",
                                  "feature_bank/feature_bank.json", "continual_state.json", "continual_clip.json",
                                  "class_prompts.safetensors"])
def test_a_truncated_file_is_named_with_the_fix(run_copy, name):
    task = run_copy / "task-1"
    truncate(task / name)
    with pytest.raises(CheckpointFileError) as info:
        if name.startswith("feature_bank"):
            FeatureBank.from_pretrained(task / "feature_bank")
        elif name == "continual_state.json":
            ContinualTrainer.from_pretrained(str(task), tasks=["a new digit"], args=args_for(run_copy.parent / "c"))
        else:
            ContinualCLIP.from_pretrained(task)
    message = str(info.value)
    assert str(task / name) in message and "again" in message, message


def test_an_old_checkpoint_without_its_own_manifest_is_verified_by_its_task_state(run_copy):
    """Checkpoints written before the model and the bank recorded their own checksums: the task's state does."""
    task = run_copy / "task-1"
    for path in (task / "continual_clip.json", task / "feature_bank" / "feature_bank.json"):
        meta = json.loads(path.read_text())
        del meta["checksums"], meta["json_sha256"]  # neither recorded by older versions
        path.write_text(json.dumps(meta))
    state = json.loads((task / "continual_state.json").read_text())
    del state["json_sha256"]
    state["checksums"] = weight_checksums(str(task))  # what older versions recorded: the weights only
    (task / "continual_state.json").write_text(json.dumps(state))
    ContinualCLIP.from_pretrained(task)
    flip_a_bit(task / "clip" / "model.safetensors")
    with pytest.raises(ChecksumError, match=r"clip/model\.safetensors is corrupt"):
        ContinualCLIP.from_pretrained(task)
    flip_a_bit(task / "feature_bank" / "feature_bank.safetensors")
    with pytest.raises(ChecksumError, match=r"feature_bank\.safetensors is corrupt"):
        FeatureBank.from_pretrained(task / "feature_bank")


def edit_text(path, old, new):
    """Change `old` to `new` (same length) in a JSON file, keeping it valid JSON: a flipped bit in a name."""
    text = path.read_text()
    assert old in text and len(old) == len(new)
    path.write_text(text.replace(old, new, 1))


def test_a_changed_class_name_in_the_json_that_lists_the_checksums_is_refused(tmp_path, processor):
    """continual_clip.json and feature_bank.json record the other files' checksums and their own (#31)."""
    model = ContinualCLIP.from_clip(build_clip("tiny"), ["cat", "dog"], processor.tokenizer)
    model.save_pretrained(tmp_path / "model")
    edit_text(tmp_path / "model" / "continual_clip.json", '"cat"', '"cot"')
    with pytest.raises(ChecksumError, match=r"continual_clip\.json is corrupt.*Copy or download"):
        ContinualCLIP.from_pretrained(tmp_path / "model")

    bank = FeatureBank()
    bank.add_classes([0, 1], {0: torch.randn(8, 4), 1: torch.randn(8, 4)}, train_contrastive=False)
    bank.save_pretrained(tmp_path / "bank")
    edit_text(tmp_path / "bank" / "feature_bank.json", '"shrinkage": 0', '"shrinkage": 1')
    with pytest.raises(ChecksumError, match=r"feature_bank\.json is corrupt"):
        FeatureBank.from_pretrained(tmp_path / "bank")


def test_a_changed_task_state_is_refused_by_every_door(run_copy):
    """continual_state.json lists the task classes and every checksum: a change is refused, not carried on."""
    from hf_pmi.cli import main

    task = run_copy / "task-1"
    state = json.loads((task / "continual_state.json").read_text())
    first = state["task_classes"][0][0]
    other = next(c for c in range(10) if c != first and len(str(c)) == len(str(first)))
    text = (task / "continual_state.json").read_text()
    head, tail = text.split('"task_classes"', 1)
    tail = tail.replace(str(first), str(other), 1)
    (task / "continual_state.json").write_text(head + '"task_classes"' + tail)
    with pytest.raises(ChecksumError, match=r"continual_state\.json is corrupt"):
        ContinualTrainer.from_pretrained(str(task), tasks=["a new digit"], args=args_for(run_copy.parent / "c"))
    with pytest.raises(ChecksumError, match=r"continual_state\.json is corrupt"):
        main(["eval", "--checkpoint", str(task)])


def test_continuing_a_clip_task_with_another_normalisation_is_refused(run_copy, processor):
    import copy

    from hf_pmi.validation import ValidationError

    other = copy.deepcopy(processor)
    other.image_processor.image_std = [0.5, 0.5, 0.5]
    with pytest.raises(ValidationError, match=r"image_std: checkpoint .*given \[0.5, 0.5, 0.5\]"):
        ContinualTrainer.from_pretrained(str(run_copy / "task-1"), tasks=["a new digit"],
                                         args=args_for(run_copy.parent / "c"), processing_class=other)
