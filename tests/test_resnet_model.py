"""ResNet32ForImageClassification: architecture, checkpoint round trip, growing heads, and the refusals."""

import pytest
import torch
from torch import nn

from hf_pmi.resnet import (
    ResNet32Config,
    ResNet32ForImageClassification,
    grow_classifier,
    require_batchnorm,
    require_image_classifier,
)


def tiny(num_labels=3, **kw):
    torch.manual_seed(0)
    return ResNet32ForImageClassification(ResNet32Config(blocks_per_stage=1, base_width=4, num_labels=num_labels, image_size=16, **kw))


def test_resnet32_matches_the_reference_architecture():
    model = ResNet32ForImageClassification(ResNet32Config(num_labels=100))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 31 and len(bns) == 31  # stem + 15 blocks x 2 (no projection shortcuts)
    assert convs[0].kernel_size == (3, 3) and convs[0].stride == (1, 1)
    assert model.classifier.bias is None and model.classifier.in_features == 64
    assert sum(p.numel() for p in model.parameters()) == 463_504 + 64 * 100  # backbone 0.46 M + head
    out = model.resnet(torch.randn(2, 3, 32, 32), output_hidden_states=True)
    assert [tuple(h.shape[1:]) for h in out.hidden_states[::5]] == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_zero_residual_blocks_start_as_identity():
    model = tiny().eval()
    block = model.resnet.stages[0][0]
    assert torch.count_nonzero(block.bn_b.weight) == 0
    x = torch.randn(2, 4, 16, 16)
    assert torch.equal(block(x), x)
    assert torch.count_nonzero(tiny(zero_residual=False).resnet.stages[0][0].bn_b.weight) == 4


def test_save_and_reload_is_bit_exact(tmp_path):
    model = tiny()
    model.train()
    model(pixel_values=torch.randn(8, 3, 16, 16))  # move the BN running moments away from their init
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = ResNet32ForImageClassification.from_pretrained(tmp_path).eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(model(pixel_values=x).logits, again(pixel_values=x).logits)


def test_auto_classes_load_it(tmp_path):
    from transformers import AutoConfig, AutoModelForImageClassification

    tiny(num_labels=2).save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ResNet32Config)
    assert isinstance(AutoModelForImageClassification.from_pretrained(tmp_path), ResNet32ForImageClassification)


def test_growing_keeps_old_rows_and_logits_bit_exact(tmp_path):
    model = tiny(num_labels=2).eval()
    x = torch.randn(3, 3, 16, 16)
    before = model(pixel_values=x).logits
    old = model.classifier.weight.detach().clone()
    model.add_classes(3, ["c", "d", "e"])
    after = model(pixel_values=x).logits
    # old rows are copied bit for bit; their logits agree to rounding (a wider matmul sums in another order)
    assert torch.equal(model.classifier.weight[:2], old)
    assert after.shape == (3, 5) and torch.allclose(after[:, :2], before, rtol=0, atol=1e-6)
    assert model.classifier.weight[2:].abs().max() < 0.01  # N(0, 0.001^2): new classes start near zero
    assert model.config.num_labels == 5 and model.num_labels == 5 and model.config.id2label[4] == "e"
    assert model.config.label2id["c"] == 2
    model.save_pretrained(tmp_path)
    again = ResNet32ForImageClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(again(pixel_values=x).logits, after)


def test_growing_keeps_the_trainable_flag_and_rejects_bad_counts():
    model = tiny()
    model.classifier.requires_grad_(False)
    grow_classifier(model, 1)
    assert not model.classifier.weight.requires_grad
    with pytest.raises(ValueError, match="num_new"):
        grow_classifier(model, 0)
    with pytest.raises(ValueError, match="names"):
        grow_classifier(model, 2, ["only one"])


def test_grows_transformers_resnet_heads_including_an_empty_one():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2)
    model = ResNetForImageClassification(config).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(pixel_values=x).logits
    bias = model.classifier[1].bias.detach().clone()
    grow_classifier(model, 2)
    after = model(pixel_values=x).logits
    assert torch.equal(model.classifier[1].bias[:2], bias) and torch.allclose(after[:, :2], before, rtol=0, atol=1e-6)
    assert torch.equal(model.classifier[1].bias[2:], torch.zeros(2))
    out = model(pixel_values=x, labels=torch.tensor([3, 0]))  # the loss follows config.num_labels
    assert out.loss is not None and out.logits.shape == (2, 4)

    empty = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=0))
    assert isinstance(empty.classifier[1], nn.Identity)
    grow_classifier(empty, 3)
    assert empty.classifier[1].out_features == 3 and empty(pixel_values=x).logits.shape == (2, 3)


def test_a_head_that_cannot_grow_is_refused_with_the_fix():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1))

    with pytest.raises(TypeError, match=r"final nn.Linear at `model.classifier`"):
        grow_classifier(Odd(), 1)
    with pytest.raises(TypeError, match="none"):
        grow_classifier(nn.Linear(2, 2), 1)


def test_models_without_batchnorm_or_images_are_refused():
    require_batchnorm(tiny())  # passes
    no_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"no BatchNorm layer with running statistics.*'lwf'"):
        require_batchnorm(no_stats, method="full_inversion")
    require_image_classifier(tiny())

    class TextModel(nn.Module):
        main_input_name = "input_ids"

    with pytest.raises(TypeError, match="pixel_values"):
        require_image_classifier(TextModel())
