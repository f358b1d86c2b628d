import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import CLIPModel

from hf_pmi import ContinualCLIP
from hf_pmi.blocks import VisionBlocks
from hf_pmi.integrity import write_json
from hf_pmi.testing import build_clip, build_tokenizer


@pytest.fixture
def tokenizer():
    return build_tokenizer()


def _randomise_lora(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA B starts at zero: make the adapter change the logits


def test_logits_are_scaled_cosines_of_image_and_class_text(tokenizer):
    clip = build_clip("tiny")
    model = ContinualCLIP.from_clip(clip, ["cat", "dog"], tokenizer).eval()
    x = torch.rand(3, 3, 32, 32)
    ids = tokenizer(["a bad photo of a cat.", "a bad photo of a dog."], padding="max_length", max_length=32,
                    return_tensors="pt")
    text = torch.nn.functional.normalize(clip.get_text_features(**ids).pooler_output, dim=-1)
    image = torch.nn.functional.normalize(clip.get_image_features(pixel_values=x).pooler_output, dim=-1)
    expected = clip.logit_scale.exp() * image @ text.t()
    assert torch.allclose(model(pixel_values=x).logits, expected, atol=1e-5)


def test_add_classes_grows_the_classifier_and_refuses_duplicates(tokenizer):
    model = ContinualCLIP.from_clip(build_clip("tiny"), ["cat"], tokenizer)
    assert model.add_classes(["dog", "bird"], tokenizer) == [1, 2]
    assert model(pixel_values=torch.rand(2, 3, 32, 32)).logits.shape == (2, 3)
    with pytest.raises(ValueError, match=r"\['dog'\] already exist"):
        model.add_classes(["dog"], tokenizer)


def test_patch_embedding_is_frozen_and_replay_joins_the_same_pass(tokenizer):
    model = ContinualCLIP.from_clip(build_clip("tiny"), ["a", "b"], tokenizer).eval()
    assert not model.clip.vision_model.embeddings.patch_embedding.weight.requires_grad
    x = torch.rand(2, 3, 32, 32)
    maps = VisionBlocks(model).patch_embed(x)
    out = model(pixel_values=x, replay_inputs=maps)
    assert torch.allclose(out.logits, out.replay_logits, atol=1e-5)


@pytest.mark.parametrize("lora", [None, "vision", "both"])
def test_save_and_reload_gives_identical_logits(tmp_path, tokenizer, lora):
    config = None
    if lora == "vision":
        config = LoraConfig(r=4)
    elif lora == "both":
        config = LoraConfig(r=4, target_modules=r".*(vision|text)_model.*\.(q_proj|v_proj)")
    model = ContinualCLIP.from_clip(build_clip("tiny"), ["cat", "dog"], tokenizer, lora=config)
    _randomise_lora(model)
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = ContinualCLIP.from_pretrained(tmp_path).eval()
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(model(pixel_values=x).logits, reloaded(pixel_values=x).logits)
    assert reloaded.class_names == ["cat", "dog"]
    meta = json.loads((tmp_path / "continual_clip.json").read_text())
    assert (meta["lora"] is None) == (lora is None)
    if lora == "both":
        trainable = [n for n, p in reloaded.named_parameters() if p.requires_grad]
        assert any("text_model" in n for n in trainable) and all("lora_" in n for n in trainable)
    # no pickle anywhere in a checkpoint
    files = [f for _, _, fs in os.walk(tmp_path) for f in fs]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]


def test_checkpoint_loads_with_plain_transformers_and_peft(tmp_path, tokenizer):
    model = ContinualCLIP.from_clip(build_clip("tiny"), ["cat", "dog"], tokenizer, lora=LoraConfig(r=4))
    _randomise_lora(model)
    model.eval().save_pretrained(tmp_path)
    base = CLIPModel.from_pretrained(tmp_path, subfolder="base")  # a base built from a config is kept in base/
    clip = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    x = torch.rand(2, 3, 32, 32)
    ours = VisionBlocks(model).features(x)
    plain = clip.get_image_features(pixel_values=x).pooler_output
    assert torch.allclose(ours, plain, atol=1e-6)


def test_clip_folder_is_a_plain_clip_whatever_peft_wrapped(tmp_path, tokenizer):
    """LoRA + modules_to_save (peft wrapper keys in the state dict): clip/ still loads into CLIPModel with no
    missing or unexpected key and gives the checkpoint's logits; the reload through ContinualCLIP is exact."""
    lora = LoraConfig(r=4, modules_to_save=["text_projection"])
    model = ContinualCLIP.from_clip(build_clip("tiny"), ["cat", "dog", "bird"], tokenizer, lora=lora)
    _randomise_lora(model)
    with torch.no_grad():  # the trained copy of the text projection differs from the original
        model.clip.base_model.model.text_projection.modules_to_save["default"].weight.mul_(-1.5)
    model.eval().save_pretrained(tmp_path)

    clip, info = CLIPModel.from_pretrained(tmp_path, subfolder="clip", output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    clip.eval()
    x = torch.rand(3, 3, 32, 32)
    ids, mask = model.prompt_ids[:, 0], model.prompt_mask[:, 0]  # one template
    with torch.no_grad():
        out = clip(input_ids=ids, attention_mask=mask, pixel_values=x)
        expected = model(pixel_values=x).logits
    assert torch.allclose(out.logits_per_image, expected, atol=1e-4)
    assert not torch.allclose(out.logits_per_image, ContinualCLIP.from_clip(build_clip("tiny"), ["cat", "dog", "bird"],
                                                                           tokenizer).eval()(pixel_values=x).logits,
                              atol=1e-2)

    reloaded = ContinualCLIP.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=x).logits, expected)
    trainable = {n for n, p in reloaded.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in trainable)  # continuing trains the same parts
    base, info = CLIPModel.from_pretrained(tmp_path, subfolder="base", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_not_a_checkpoint_says_what_to_do(tmp_path):
    build_clip("tiny").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="from_clip"):
        ContinualCLIP.from_pretrained(tmp_path)


def test_a_format_1_checkpoint_loads_and_routes_as_it_did():
    """A checkpoint written before routing became a component of its own (format 1, hf_pmi 5e0f113;
    tests/fixtures/README.md) loads, routes the same classes and gives the same routed scores."""
    from pathlib import Path

    from safetensors.torch import load_file

    fixtures = Path(__file__).parent / "fixtures"
    model = ContinualCLIP.from_pretrained(fixtures / "format1_routed_checkpoint").eval()
    expected = load_file(fixtures / "format1_routed_expected.safetensors")
    assert model.routed_classes == [7, 8, 9]
    with torch.no_grad():
        out = model(pixel_values=expected["pixel_values"])
    # The expected scores were computed on another machine: float32 kernels (BLAS, SIMD width) differ
    # in the last bits across CPUs (CI measured 2.9e-6 on scores of magnitude ~3), so the tolerance is
    # a few float32 ulps of that magnitude; a wrong routing or a lost weight moves them by >1e-2.
    torch.testing.assert_close(out.routed_logits, expected["routed_log_probs"], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.routed_logits.argmax(-1), expected["routed_log_probs"].argmax(-1))


def test_a_checkpoint_of_a_newer_format_names_the_version_and_the_fix(tmp_path, tokenizer):
    import json

    ContinualCLIP.from_clip(build_clip("tiny"), class_names=["a"], tokenizer=tokenizer).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "continual_clip.json").read_text())
    assert meta["format_version"] == 2
    meta["format_version"] = 99
    write_json(str(tmp_path / "continual_clip.json"), meta, seal=True)  # as a newer hf_pmi would write it
    with pytest.raises(ValueError, match="format version 99.*upgrade hf_pmi"):
        ContinualCLIP.from_pretrained(tmp_path)


def test_a_lora_checkpoint_on_a_local_base_is_self_contained(tmp_path, digits, processor):
    """The base is written to base/ (no local path in continual_clip.json, adapter_config.json or the card),
    so the checkpoint loads after the base folder moved away."""
    from hf_pmi import ContinualConfig, ContinualTrainer, split_class_incremental

    source = tmp_path / "my_local_clip"
    build_clip("tiny", seed=5).save_pretrained(source)
    model = ContinualCLIP.from_clip(str(source), lora=LoraConfig(r=4))
    args = ContinualConfig(output_dir=str(tmp_path / "run"), method="finetune", max_steps=1,
                           per_device_train_batch_size=16, disable_tqdm=True, seed=0)
    tasks = split_class_incremental(digits, num_tasks=2, seed=0)
    ContinualTrainer(model=model, args=args, tasks=tasks, processing_class=processor).train()
    task = tmp_path / "run" / "task-1"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = ContinualCLIP.from_pretrained(task).eval()(pixel_values=x).logits
    source.rename(tmp_path / "moved_away")
    with torch.no_grad():
        after = ContinualCLIP.from_pretrained(task).eval()(pixel_values=x).logits
    assert torch.equal(before, after)
    assert (task / "base" / "model.safetensors").is_file()
    meta = json.loads((task / "continual_clip.json").read_text())
    assert meta["base_saved"] and meta["base_model_name_or_path"] is None
    assert json.loads((task / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    for path in task.rglob("*"):
        if path.suffix in (".json", ".md"):
            assert "my_local_clip" not in path.read_text(), path  # no local path anywhere
