"""Vision-side embeddings: object crops (+ depth channel) to patch tokens, and the
pooling of each object's tokens into one object token (+ its box).

The text side uses the BERT tower's own ``BertEmbeddings`` unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ObjectPatchEmbeddings", "ObjectPooling"]


class ObjectPatchEmbeddings(nn.Module):
    """Each object crop -> its RGB patch tokens, then (with depth) its depth patch tokens.

    The RGB patches go through the ViT's patch convolution; the depth channel through its own
    1-channel convolution, initialized as the mean over RGB of the ViT's patch weights. Both get the
    same patch position embeddings, resampled from the ViT's pre-trained grid (no class token), then
    the ViT's pre-LayerNorm. Output ``[B, P * tokens_per_object, D]``, objects in slot order.
    """

    def __init__(self, vit: nn.Module, crop_size: int, use_depth: bool) -> None:
        super().__init__()
        from timm.layers import resample_abs_pos_embed

        self.rgb_patch = vit.patch_embed.proj
        self.patch_norm = vit.patch_embed.norm
        patch = self.rgb_patch.kernel_size[0]
        if crop_size % patch:
            raise ValueError(
                f"features.crop_size {crop_size} is not a multiple of the vision tower's patch size "
                f"{patch}"
            )
        grid = crop_size // patch
        self.depth_patch = None
        if use_depth:
            self.depth_patch = nn.Conv2d(
                1, self.rgb_patch.out_channels, patch, patch, bias=self.rgb_patch.bias is not None
            )
            with torch.no_grad():
                self.depth_patch.weight.copy_(self.rgb_patch.weight.mean(dim=1, keepdim=True))
                if self.depth_patch.bias is not None:
                    self.depth_patch.bias.copy_(self.rgb_patch.bias)
        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        old_grid = list(vit.patch_embed.grid_size)
        grid_embed = vit.pos_embed.detach()[:, prefix:]
        self.position = nn.Parameter(
            resample_abs_pos_embed(grid_embed, [grid, grid], old_grid, num_prefix_tokens=0).clone()
        )
        self.pre_norm = vit.norm_pre
        self.tokens_per_object = grid * grid * (2 if use_depth else 1)

    def _patches(self, conv: nn.Conv2d, images: torch.Tensor) -> torch.Tensor:
        tokens = conv(images).flatten(2).transpose(1, 2)  # [N, grid^2, D]
        return self.patch_norm(tokens) + self.position

    def forward(
        self, pixel_values: torch.Tensor, depth_values: torch.Tensor | None
    ) -> torch.Tensor:
        batch, slots, channels, size, _ = pixel_values.shape
        tokens = self._patches(self.rgb_patch, pixel_values.reshape(-1, channels, size, size))
        if self.depth_patch is not None:
            depth = depth_values.reshape(-1, 1, size, size).to(pixel_values.dtype)
            tokens = torch.cat([tokens, self._patches(self.depth_patch, depth)], dim=1)
        return self.pre_norm(tokens.reshape(batch, slots * self.tokens_per_object, -1))


class ObjectPooling(nn.Module):
    """Average each object's tokens into one token, add ``Linear(5, D)(box)``, LayerNorm (eps 1e-12,
    as the original), dropout."""

    def __init__(self, hidden: int, tokens_per_object: int, use_box: bool, dropout: float) -> None:
        super().__init__()
        self.tokens_per_object = tokens_per_object
        self.box = nn.Linear(5, hidden) if use_box else None
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        batch, length, hidden = tokens.shape
        objects = tokens.reshape(batch, length // self.tokens_per_object, -1, hidden).mean(dim=2)
        if self.box is not None:
            objects = objects + self.box(boxes.to(objects.dtype))
        return self.dropout(self.norm(objects))
