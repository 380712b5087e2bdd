"""Vision-side embeddings: object crops (+ depth channel) to patch tokens, and the
pooling of each object's tokens into one object token (+ its box).

The text side uses the BERT tower's own ``BertEmbeddings`` unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import DEPTH_EMBEDDINGS

__all__ = ["ObjectPatchEmbeddings", "ObjectPooling"]


class ObjectPatchEmbeddings(nn.Module):
    """Each object crop -> its patch tokens, RGB and (with depth) depth.

    The RGB patches go through the ViT's patch convolution; the depth channel through its own
    1-channel convolution, initialized as the mean over RGB of the ViT's patch weights. Then the
    patch position embeddings, resampled from the ViT's pre-trained grid (no class token), and the
    ViT's pre-LayerNorm. Output ``[B, P * tokens_per_object, D]``, objects in slot order.

    ``depth_embedding`` places the depth patches:

    - ``"tokens"`` (the original): their own tokens after the object's RGB tokens, each with the
      position embeddings, so an object has twice the patches. The pre-LayerNorm normalizes each
      token alone, which makes a patch of constant depth ``d`` give nearly the same token for every
      ``d`` once ``d`` times the convolution outweighs the position embedding: the depth *level*
      of flat regions is lost, only its pattern (edges, gradients) stays.
    - ``"channel"``: a 4th input channel of the RGB patch convolution (the two convolutions summed),
      one token per patch, so the depth level moves each token against its RGB part.
    """

    def __init__(
        self, vit: nn.Module, crop_size: int, use_depth: bool, depth_embedding: str = "tokens"
    ) -> None:
        super().__init__()
        if depth_embedding not in DEPTH_EMBEDDINGS:
            raise ValueError(
                f"model.depth_embedding {depth_embedding!r}: expected one of "
                + ", ".join(repr(name) for name in DEPTH_EMBEDDINGS)
            )
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
        self.depth_as_channel = depth_embedding == "channel"
        self.depth_patch = None
        if use_depth:
            # As a channel, the depth weights join the RGB convolution, whose bias is the only one.
            bias = self.rgb_patch.bias is not None and not self.depth_as_channel
            self.depth_patch = nn.Conv2d(1, self.rgb_patch.out_channels, patch, patch, bias=bias)
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
        own_tokens = use_depth and not self.depth_as_channel
        self.patches_per_crop = grid * grid
        self.tokens_per_object = self.patches_per_crop * (2 if own_tokens else 1)

    def _patches(self, patches: torch.Tensor) -> torch.Tensor:
        tokens = patches.flatten(2).transpose(1, 2)  # [N, grid^2, D]
        return self.patch_norm(tokens) + self.position

    def patch_tokens(
        self, pixel_values: torch.Tensor, depth_values: torch.Tensor | None
    ) -> torch.Tensor:
        """Each crop's tokens before the pre-LayerNorm, ``[B * P, tokens_per_object, D]``: with
        ``"tokens"`` the RGB patches then the depth patches, so the last ``patches_per_crop`` are
        the depth ones in either mode (with ``"channel"``, the RGB-D ones)."""
        channels, size = pixel_values.shape[2], pixel_values.shape[-1]
        rgb = self.rgb_patch(pixel_values.reshape(-1, channels, size, size))
        if self.depth_patch is None:
            return self._patches(rgb)
        depth = self.depth_patch(depth_values.reshape(-1, 1, size, size).to(pixel_values.dtype))
        if self.depth_as_channel:
            return self._patches(rgb + depth)
        return torch.cat([self._patches(rgb), self._patches(depth)], dim=1)

    def forward(
        self, pixel_values: torch.Tensor, depth_values: torch.Tensor | None
    ) -> torch.Tensor:
        batch, slots = pixel_values.shape[:2]
        tokens = self.patch_tokens(pixel_values, depth_values)
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
