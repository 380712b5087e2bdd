"""The vision tower by name: the timm name it stands for and the pixel normalization it brings."""

from __future__ import annotations

import pytest
import timm

from pipeline.model.towers import save_vision_tower
from pipeline.vision import TINY_VISION_ARCHITECTURE, pixel_normalization, timm_name

CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("tiny", CLIP),  # a CLIP ViT: the constants the original hard-coded, exactly
        ("vit_base_patch32_clip_quickgelu_224.openai", CLIP),  # the paper preset
        ("deit_tiny_patch16_224", IMAGENET),
        ("vit_tiny_patch16_224", ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))),
    ],
)
def test_a_tower_name_brings_its_pretrained_cfg_normalization(name, expected):
    assert pixel_normalization(name) == expected


def test_a_tower_folder_brings_the_normalization_of_its_architecture(tmp_path):
    model = timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, num_classes=0, embed_dim=32, depth=1, num_heads=2
    )
    folder = save_vision_tower(model, tmp_path / "vit")
    assert timm_name(str(folder)) == f"local-dir:{folder.resolve()}"
    assert pixel_normalization(str(folder)) == IMAGENET


def test_timm_names_of_tiny_hub_and_a_folder_that_is_no_tower(tmp_path):
    assert timm_name("tiny") == TINY_VISION_ARCHITECTURE
    assert timm_name("deit_tiny_patch16_224") == "deit_tiny_patch16_224"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a vision tower folder"):
        timm_name(str(tmp_path / "empty"))
