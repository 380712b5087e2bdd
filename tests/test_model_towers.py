"""The towers by name: tiny presets, local folders (saved here) loaded through the same calls as hub
names, pretrained weights landing where the encoder uses them, and clear errors."""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from torch.nn import functional as F
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

from pipeline.config import Params, default_params
from pipeline.model.remote import build_model
from pipeline.model.towers import (
    TINY_TEXT_CONFIG,
    TINY_VISION_ARCHITECTURE,
    TINY_VISION_ARGS,
    load_text_tower,
    load_vision_tower,
    save_vision_tower,
    text_tower_from_spec,
    vision_tower_from_spec,
)
from pipeline.text import MARKERS, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def params(**overrides) -> Params:
    return default_params({"data.max_objects": 4, **overrides})


def save_text(folder, vocab_size: int, seed: int = 5, **config) -> BertModel:
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=vocab_size, **{**TINY_TEXT_CONFIG, **config}))
    model.save_pretrained(folder)
    return model


def save_vision(folder, seed: int = 6, **args):
    torch.manual_seed(seed)
    model = timm.create_model(
        TINY_VISION_ARCHITECTURE, pretrained=False, num_classes=0, **{**TINY_VISION_ARGS, **args}
    )
    save_vision_tower(model, folder)
    return model


def test_tiny_presets(tokenizer):
    text, text_spec = load_text_tower("tiny", True, len(tokenizer))
    config = text.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (
        len(tokenizer),
        64,
        4,
    )
    assert (config.num_attention_heads, config.intermediate_size) == (4, 128)
    vision, vision_spec = load_vision_tower("tiny", True)
    assert (vision.embed_dim, len(vision.blocks), vision.blocks[0].attn.num_heads) == (64, 4, 4)
    assert vision.patch_embed.patch_size == (32, 32)
    assert isinstance(vision.blocks[0].mlp.act, timm.layers.QuickGELU)
    # The specs rebuild the same architectures.
    assert text_tower_from_spec(text_spec).config.to_dict() == config.to_dict()
    assert not {"id2label", "label2id"} & set(text_spec["bert_config"])
    rebuilt = vision_tower_from_spec(vision_spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in vision.state_dict().items()
    }


def test_local_folders_load_the_saved_weights(tmp_path, tokenizer):
    # A BERT saved without the 12 markers, as a hub checkpoint is: its embeddings get resized.
    text = save_text(tmp_path / "bert", len(tokenizer) - len(MARKERS))
    vision = save_vision(tmp_path / "vit")
    names = {
        "model.text_model": str(tmp_path / "bert"),
        "model.vision_model": str(tmp_path / "vit"),
    }
    torch.manual_seed(0)
    model = build_model(params(**names), 28, tokenizer)

    words = model.text_embeddings.word_embeddings.weight
    assert words.shape[0] == len(tokenizer)
    assert torch.equal(
        words[: len(tokenizer) - len(MARKERS)], text.embeddings.word_embeddings.weight
    )
    query = model.encoder.text_layers[2].layer.attention.self.query.weight
    assert torch.equal(query, text.encoder.layer[2].attention.self.query.weight)
    qkv = model.encoder.vision_layers[3].block.attn.qkv.weight
    assert torch.equal(qkv, vision.blocks[3].attn.qkv.weight)
    embeddings = model.object_embeddings
    assert torch.equal(embeddings.rgb_patch.weight, vision.patch_embed.proj.weight)
    assert torch.equal(embeddings.pre_norm.weight, vision.norm_pre.weight)
    # Depth patch weights: the mean over RGB of the pretrained patch weights.
    depth_init = vision.patch_embed.proj.weight.mean(dim=1, keepdim=True)
    assert torch.allclose(embeddings.depth_patch.weight, depth_init, atol=1e-7)
    # Patch positions: the pretrained 7x7 grid (class token dropped) resampled to the crop's 2x2.
    grid = vision.pos_embed[:, 1:].reshape(1, 7, 7, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(2, 2), mode="bicubic", antialias=True)
    assert torch.allclose(embeddings.position, expected.flatten(2).transpose(1, 2), atol=1e-6)

    # pretrained=false keeps the folder's architecture with fresh weights.
    torch.manual_seed(0)
    fresh = build_model(params(**names, **{"model.pretrained": False}), 28, tokenizer)
    fresh_qkv = fresh.encoder.vision_layers[3].block.attn.qkv.weight
    assert fresh_qkv.shape == qkv.shape and not torch.equal(fresh_qkv, qkv)


def test_hub_names_and_local_folders_share_one_loader(tmp_path, tokenizer, monkeypatch):
    """A hub name and a folder reach the same library calls; a fake hub serves the saved folders."""
    save_text(tmp_path / "bert", len(tokenizer))
    save_vision(tmp_path / "vit")
    calls = []
    hub = {"bert-base-uncased": str(tmp_path / "bert")}
    real_config = transformers.AutoConfig.from_pretrained
    real_model = transformers.AutoModel.from_pretrained
    real_create = timm.create_model

    def config_from(name, *args, **kwargs):
        return real_config(hub.get(name, name), *args, **kwargs)

    def model_from(name, *args, **kwargs):
        calls.append(("AutoModel.from_pretrained", name))
        return real_model(hub.get(name, name), *args, **kwargs)

    def create(name, pretrained=False, **kwargs):
        calls.append(("timm.create_model", name, pretrained))
        if name == "vit_base_patch32_clip_quickgelu_224.openai":
            name = f"local-dir:{tmp_path / 'vit'}"
        return real_create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config_from)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", model_from)
    monkeypatch.setattr(timm, "create_model", create)
    models = []
    for text_name, vision_name in [
        ("bert-base-uncased", "vit_base_patch32_clip_quickgelu_224.openai"),
        (str(tmp_path / "bert"), str(tmp_path / "vit")),
    ]:
        torch.manual_seed(0)
        overrides = {"model.text_model": text_name, "model.vision_model": vision_name}
        models.append(build_model(params(**overrides), 28, tokenizer))
    assert calls == [
        ("AutoModel.from_pretrained", "bert-base-uncased"),
        ("timm.create_model", "vit_base_patch32_clip_quickgelu_224.openai", True),
        ("AutoModel.from_pretrained", str(tmp_path / "bert")),
        ("timm.create_model", f"local-dir:{tmp_path / 'vit'}", True),
    ]
    hub_state, local_state = (m.state_dict() for m in models)
    assert hub_state.keys() == local_state.keys()
    assert all(torch.equal(hub_state[k], local_state[k]) for k in hub_state)


def test_the_text_spec_keeps_no_head_labels_of_its_checkpoint(tmp_path, tokenizer):
    """A checkpoint fine-tuned for classification carries its head's labels; the tower has no head,
    so a saved model's config.json must not show them beside the model's own labels."""
    save_text(tmp_path / "bert", len(tokenizer), id2label={0: "negative", 1: "neutral", 2: "pos"})
    text, spec = load_text_tower(str(tmp_path / "bert"), True, len(tokenizer))
    assert text.config.id2label[2] == "pos"  # the checkpoint's config, as loaded
    assert "id2label" not in spec["bert_config"] and "label2id" not in spec["bert_config"]
    rebuilt = text_tower_from_spec(spec).config.to_dict()
    loaded = text.config.to_dict()
    for config in (rebuilt, loaded):
        del config["id2label"], config["label2id"]
    assert rebuilt == loaded


def test_unequal_hidden_sizes_fail_clearly(tmp_path, tokenizer):
    save_vision(tmp_path / "vit", embed_dim=32)
    with pytest.raises(ValueError, match="hidden size is 64 but the vision tower's is 32"):
        build_model(params(**{"model.vision_model": str(tmp_path / "vit")}), 28, tokenizer)


def test_unequal_layer_counts_fail_clearly(tmp_path, tokenizer):
    save_vision(tmp_path / "vit", depth=3)
    with pytest.raises(ValueError, match="4 layers but the vision tower has 3"):
        build_model(params(**{"model.vision_model": str(tmp_path / "vit")}), 28, tokenizer)


def test_non_bert_text_tower_fails_clearly(tmp_path, tokenizer):
    DistilBertModel(
        DistilBertConfig(dim=64, n_layers=2, n_heads=2, hidden_dim=128)
    ).save_pretrained(tmp_path / "distil")
    with pytest.raises(ValueError, match="model type 'distilbert' is not supported"):
        build_model(params(**{"model.text_model": str(tmp_path / "distil")}), 28, tokenizer)


def test_crop_size_must_be_a_multiple_of_the_patch(tokenizer):
    with pytest.raises(ValueError, match="crop_size 48 is not a multiple"):
        build_model(params(**{"features.crop_size": 48}), 28, tokenizer)


def test_vision_folder_without_config_fails_clearly(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a vision tower folder"):
        build_model(params(**{"model.vision_model": str(tmp_path / "empty")}), 28, tokenizer)


def test_relative_position_text_towers_are_refused_by_name_and_by_spec(tmp_path, tokenizer):
    save_text(tmp_path / "bert", len(tokenizer), position_embedding_type="relative_key")
    with pytest.raises(ValueError, match="only absolute position embeddings are supported"):
        build_model(params(**{"model.text_model": str(tmp_path / "bert")}), 28, tokenizer)
    _, spec = load_text_tower("tiny", False, len(tokenizer))
    relative = {**spec["bert_config"], "position_embedding_type": "relative_key"}
    with pytest.raises(ValueError, match="'from config': only absolute position embeddings"):
        text_tower_from_spec({"bert_config": relative})


def test_a_vision_tower_is_never_saved_over_an_existing_folder(tmp_path):
    save_vision(tmp_path / "vit", seed=6)
    before = (tmp_path / "vit" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        save_vision(tmp_path / "vit", seed=7)
    assert (tmp_path / "vit" / "model.safetensors").read_bytes() == before


def test_pretrained_false_gives_fresh_weights_in_the_text_folders_architecture(tmp_path, tokenizer):
    saved = save_text(tmp_path / "bert", len(tokenizer), intermediate_size=96)
    torch.manual_seed(0)
    text, spec = load_text_tower(str(tmp_path / "bert"), False, len(tokenizer))
    assert text.config.intermediate_size == spec["bert_config"]["intermediate_size"] == 96
    fresh = text.encoder.layer[1].attention.self.query.weight
    kept = saved.encoder.layer[1].attention.self.query.weight
    assert fresh.shape == kept.shape and not torch.equal(fresh, kept)
