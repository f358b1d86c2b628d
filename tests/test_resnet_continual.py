"""The BN family's class-incremental loop (`hf_pmi.resnet.continual`) on a tiny ResNet and generated images."""

import pytest
import torch
from torch import nn

from hf_pmi.resnet import (
    BNInversionConfig,
    ResNet32Config,
    ResNet32ForImageClassification,
)
from hf_pmi.resnet.continual import ResNetContinualConfig, TensorTask, learn_tasks

SIZE = 8


def colour_tasks(num_tasks=2, per_task=2, n=24, seed=0):
    """Class c: images of one colour (its own RGB offsets) plus noise; easy to learn, easy to forget."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randn(num_tasks * per_task, 3, generator=g) * 1.5
    tasks = []
    for t in range(num_tasks):
        ids = list(range(t * per_task, (t + 1) * per_task))
        y = torch.tensor(ids).repeat(n // per_task)
        x = colours[y].view(-1, 3, 1, 1) + 0.3 * torch.randn(len(y), 3, SIZE, SIZE, generator=g)
        yt = torch.tensor(ids).repeat(8)
        xt = colours[yt].view(-1, 3, 1, 1) + 0.3 * torch.randn(len(yt), 3, SIZE, SIZE, generator=g)
        tasks.append(TensorTask(ids, x, y, xt, yt))
    return tasks


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=0, image_size=SIZE))


def config(method, **kw):
    tiny_inversion = BNInversionConfig(layer_steps=2, refine_steps=3, warmup=1)
    base = {"method": method, "epochs": 8, "later_epochs": 6, "head_epochs": 1, "batch_size": 8, "replay_per_class": 4,
            "shift": 0, "inversion": tiny_inversion, "progress": False}
    return ResNetContinualConfig(**{**base, **kw})


def test_each_class_is_inverted_once_and_replayed():
    result = learn_tasks(tiny_model(), colour_tasks(num_tasks=3), config("pmi"))
    # classes of tasks 0 and 1 inverted once each, after their task; the last task's never (nothing follows it)
    assert result["inverted_classes"] == {0: 1, 1: 1, 2: 1, 3: 1}
    assert result["inversion_passes"] > 0 and result["inversion_seconds"] > 0
    matrix = result["accuracy_matrix"]
    assert [sum(a is not None for a in row) for row in matrix] == [1, 2, 3]
    assert matrix[0][0] > 0.9  # the first task is learned (chance 0.5)


def test_full_inversion_spends_the_same_passes_as_pmi():
    tasks = colour_tasks()
    pmi = learn_tasks(tiny_model(), tasks, config("pmi"))
    full = learn_tasks(tiny_model(), tasks, config("full_inversion"))
    assert full["inversion_passes"] == pytest.approx(pmi["inversion_passes"], rel=0.05)


def test_replaying_real_samples_keeps_old_classes_that_finetuning_forgets():
    tasks = colour_tasks()
    finetune = learn_tasks(tiny_model(), tasks, config("finetune"))
    exemplar = learn_tasks(tiny_model(), tasks, config("exemplar_replay"))
    assert finetune["accuracy_matrix"][1][0] < 0.2  # CE on the new classes only: the old ones are overwritten
    assert exemplar["accuracy_matrix"][1][0] > 0.6
    assert exemplar["inverted_classes"] == {}


def test_lwf_loss_drops_within_a_task():
    result = learn_tasks(tiny_model(), colour_tasks(), config("lwf"))
    assert all(step["last_loss"] < step["first_loss"] for step in result["losses"])


def test_bad_inputs_are_refused_before_any_work():
    with pytest.raises(ValueError, match="Unknown method 'nope'"):
        ResNetContinualConfig(method="nope")

    class NoBN(nn.Module):
        main_input_name = "pixel_values"

        def __init__(self):
            super().__init__()
            self.config = ResNet32Config(num_labels=0)
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.classifier = nn.Linear(4, 0)

    with pytest.raises(ValueError, match="BatchNorm"):
        learn_tasks(NoBN(), colour_tasks(), config("pmi"))
    tasks = colour_tasks()
    tasks[1].class_ids = [5, 6]
    with pytest.raises(ValueError, match=r"Task 1 has classes \[5, 6\]; they must be 2, 3"):
        learn_tasks(tiny_model(), tasks, config("finetune"))
    tasks = colour_tasks()
    tasks[0].y_test = tasks[0].y_test + 2
    with pytest.raises(ValueError, match="test labels hold classes"):
        learn_tasks(tiny_model(), tasks, config("finetune"))


def test_a_transformers_resnet_learns_with_pmi_in_the_same_loop():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                      num_labels=0, downsample_in_first_stage=False))
    result = learn_tasks(model, colour_tasks(), config("pmi"))
    assert model.config.num_labels == 4 and model.classifier[-1].out_features == 4
    assert result["inverted_classes"] == {0: 1, 1: 1}
    assert result["accuracy_matrix"][0][0] > 0.9  # chance 0.5


def test_models_that_cannot_take_part_are_refused_naming_the_fix():
    from transformers import BertConfig, BertForSequenceClassification

    text = BertForSequenceClassification(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                                    num_attention_heads=1, intermediate_size=8))
    with pytest.raises(TypeError, match="takes 'input_ids', not images.*AutoModelForImageClassification"):
        learn_tasks(text, colour_tasks(), config("pmi"))
    model = tiny_model()
    model.classifier = nn.Sequential(nn.Linear(16, 4), nn.ReLU())
    with pytest.raises(TypeError, match="no classifier head that can grow.*give your model such a head"):
        learn_tasks(model, colour_tasks(), config("finetune"))


def test_a_transformers_resnet_with_classes_of_its_own_continues_after_them():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                      num_labels=2, downsample_in_first_stage=False))
    tasks = colour_tasks()[1:]  # classes 2, 3: after the model's own 0, 1
    learn_tasks(model, tasks, config("finetune", epochs=1))
    assert model.classifier[-1].out_features == 4
    with pytest.raises(ValueError, match=r"Task 0 has classes \[0, 1\]; they must be 4, 5"):
        learn_tasks(model, colour_tasks()[:1], config("finetune", epochs=1))
