"""Nothing silent, round 2 (#31): each case goes through the door a user takes (a loader, the pipeline,
the CLI) and is refused with the cause and the fix, or made right."""

import json
import os
from pathlib import Path

import pytest
import torch

from hf_pmi.integrity import ChecksumError


def flip_a_bit(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture
def resnet_task(tmp_path):
    """A finished task folder of a BN-family run, as `save_task` writes it (model, processor, state)."""
    from transformers import ViTImageProcessorPil

    from hf_pmi.resnet import ResNet32Config, ResNet32ForImageClassification
    from hf_pmi.resnet.checkpoint import save_task

    torch.manual_seed(0)
    config = ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=2, image_size=8,
                            id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    model = ResNet32ForImageClassification(config)
    processor = ViTImageProcessorPil(size={"height": 8, "width": 8})
    state = {"task_id": 0, "num_tasks": 1, "method": "finetune", "accuracy_matrix": [[1.0]], "task_classes": [[0, 1]]}
    return save_task(str(tmp_path / "run"), model, {"pool_y": torch.zeros(0, dtype=torch.long)}, state,
                     processor=processor)


@pytest.mark.parametrize("corrupt", ["weights", "id2label"])
def test_a_corrupt_resnet_task_folder_is_refused_by_automodel_and_pipeline(resnet_task, corrupt):
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    folder = resnet_task
    assert pipeline("image-classification", model=folder)(Image.new("RGB", (8, 8)))  # intact: serves
    if corrupt == "weights":
        flip_a_bit(Path(folder) / "model.safetensors")
        name = "model.safetensors"
    else:
        path = os.path.join(folder, "config.json")
        text = open(path).read()
        assert '"cat"' in text
        open(path, "w").write(text.replace('"cat"', '"cot"', 1))
        name = "config.json"
    with pytest.raises(ChecksumError, match=rf"{name} is corrupt.*Copy or download"):
        AutoModelForImageClassification.from_pretrained(folder)
    with pytest.raises(ValueError, match=rf"{name} is corrupt"):  # transformers wraps the ChecksumError, text kept
        pipeline("image-classification", model=folder)


def test_verify_task_folder_serves_transformers_own_classes(resnet_task):
    """The documented call before a loader hf_pmi does not own; a plain model folder is not a task."""
    from hf_pmi.checkpoint import verify_task_folder

    assert verify_task_folder(resnet_task) is True
    os.remove(os.path.join(resnet_task, "preprocessor_config.json"))
    with pytest.raises(ChecksumError, match=r"preprocessor_config\.json is missing"):
        verify_task_folder(resnet_task)
    os.remove(os.path.join(resnet_task, "continual_state.json"))
    assert verify_task_folder(resnet_task) is False
