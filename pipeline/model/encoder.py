"""The dual-stream encoder: BERT layer ``i`` beside ViT layer ``i``.

Per layer ``i``, in this order:

1. vision layer ``i``; from ``fusion_start`` on, its attention keys/values are prefixed with those of
   text layer ``i - 1``;
2. after vision layer ``pool_after`` only: object pooling (each object's tokens -> one token + box);
3. text layer ``i``; from ``fusion_start`` on it fuses the current object tokens into its
   intermediate: ``act(W1 h + W_f softmax(ctx V^T) V)`` (``W_f`` has a bias);
4. for ``i >= 1``, multilevel OT in each stream over the states recorded before layer ``i``.

The layers reuse the towers' own modules (``BertLayer``, timm ``Block``) and only replace their
forward passes, so pretrained weights load unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.config import OTParams
from pipeline.model.embeddings import ObjectPooling
from pipeline.model.ot import MultilevelTransport, UniformTransport, token_sum
from pipeline.model.regime import regime_paused

__all__ = ["TextLayer", "VisionLayer", "DualStreamEncoder", "EncoderStates"]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, hidden = x.shape
    return x.reshape(batch, length, heads, hidden // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


class TextLayer(nn.Module):
    """A BERT layer that exports its keys/values and, with ``fuse``, fuses object tokens."""

    def __init__(self, bert_layer: nn.Module, fuse: bool) -> None:
        super().__init__()
        if getattr(bert_layer, "crossattention", None) is not None:
            raise ValueError("text tower: BERT layers with cross-attention are not supported")
        self.layer = bert_layer
        self.num_heads = bert_layer.attention.self.num_attention_heads
        intermediate = bert_layer.intermediate.dense
        self.fusion = (
            nn.Linear(intermediate.in_features, intermediate.out_features) if fuse else None
        )

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        objects: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``hidden`` ``[B, T, D]``, ``attention_mask`` ``[B, 1, 1, T]`` bool or None, ``objects``
        ``[B, P, D]`` when fusing -> (output ``[B, T, D]``, (keys, values) ``[B, T, D]``)."""
        attention = self.layer.attention
        keys = attention.self.key(hidden)
        values = attention.self.value(hidden)
        context = F.scaled_dot_product_attention(
            _split_heads(attention.self.query(hidden), self.num_heads),
            _split_heads(keys, self.num_heads),
            _split_heads(values, self.num_heads),
            attn_mask=attention_mask,
            dropout_p=attention.self.dropout.p if self.training else 0.0,
        )
        context = _merge_heads(context)  # before the output projection
        attended = attention.output(context, hidden)
        intermediate = self.layer.intermediate.dense(attended)
        if self.fusion is not None:
            fused = torch.softmax(context @ objects.transpose(1, 2), dim=-1) @ objects
            intermediate = intermediate + self.fusion(fused)
        intermediate = self.layer.intermediate.intermediate_act_fn(intermediate)
        return self.layer.output(intermediate, attended), (keys, values)


class VisionLayer(nn.Module):
    """A timm ViT block whose attention can take prefix keys/values (from the text stream)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        if (
            type(block) is not Block
            or type(block.attn) is not Attention
            or block.attn.gate is not None
        ):
            raise ValueError(
                f"vision tower: block type {type(block).__name__} is not supported; use a timm "
                "VisionTransformer with standard pre-norm blocks (e.g. the CLIP ViTs)"
            )
        self.block = block

    def forward(
        self,
        hidden: torch.Tensor,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        prefix_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden`` ``[B, N, D]``; ``prefix`` keys/values ``[B, T, D]`` put before the block's own;
        ``prefix_mask`` ``[B, 1, 1, T + N]`` bool (True = attend) or None."""
        block, attn = self.block, self.block.attn
        batch, length, _ = hidden.shape
        qkv = attn.qkv(block.norm1(hidden)).reshape(batch, length, 3, attn.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if prefix is not None:
            k = torch.cat([_split_heads(prefix[0], attn.num_heads), k], dim=2)
            v = torch.cat([_split_heads(prefix[1], attn.num_heads), v], dim=2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=prefix_mask, dropout_p=attn.attn_drop.p if self.training else 0.0
        )
        out = attn.proj_drop(attn.proj(attn.norm(_merge_heads(out))))
        hidden = hidden + block.drop_path1(block.ls1(out))
        return hidden + block.drop_path2(block.ls2(block.mlp(block.norm2(hidden))))


class _UniformSources:
    """``model.ot.mode: uniform`` in the encoder: the mean of the recorded states ``0 .. i-1`` (over
    their real tokens) kept as running sums, so no layer concatenates its earlier states."""

    def __init__(self, encoder: DualStreamEncoder, states: EncoderStates, pad_mask) -> None:
        self.encoder, self.states, self.pad_mask = encoder, states, pad_mask
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def step(self, i: int, text: torch.Tensor, vision: torch.Tensor):
        """Layer ``i``'s transport of both streams (from the sums over states ``0 .. i-1``), then
        the layer's input, state ``i``, joins the sums for the next layer."""
        if i >= 1:
            text = self.encoder.text_transport[i - 1].add_mean(
                text, self._mean("text"), self.pad_mask
            )
            vision = self.encoder.vision_transport[i - 1].add_mean(vision, self._mean("vision"))
        for stream, mask in (("text", self.pad_mask), ("vision", None)):
            total, count = token_sum(getattr(self.states, stream)[i], mask)
            if stream in self.sums:
                total, count = total + self.sums[stream][0], count + self.sums[stream][1]
            self.sums[stream] = (total, count)
        return text, vision

    def _mean(self, stream: str) -> torch.Tensor:
        total, count = self.sums[stream]
        return total / count


def _recompute_unmonitored(encoder: DualStreamEncoder) -> dict:
    """``checkpoint``'s keyword arguments: while an OT regime monitor records (eager steps only),
    the recomputation in the backward pass adds nothing to it (it saw the layer once already)."""
    monitored = any(
        getattr(module, "regime", None) is not None
        for module in (*(encoder.text_transport or ()), *(encoder.vision_transport or ()))
    )
    if not monitored:
        return {}  # a compiled graph takes only selective-checkpointing contexts
    return {"context_fn": lambda: (contextlib.nullcontext(), regime_paused())}


@dataclass
class EncoderStates:
    """Per stream: the state at the start of every layer and the final output (``L + 1`` each)."""

    text: list[torch.Tensor]
    vision: list[torch.Tensor]


class DualStreamEncoder(nn.Module):
    """Runs both towers' layers side by side with prefix attention, fusion, pooling and OT."""

    def __init__(
        self,
        bert_layers: list[nn.Module],
        vit_blocks: list[nn.Module],
        pooling: ObjectPooling,
        *,
        pool_after_layer: int,
        fusion_start_layer: int,
        ot: OTParams | None,
    ) -> None:
        super().__init__()
        num_layers = len(bert_layers)
        if len(vit_blocks) != num_layers:
            raise ValueError(
                f"the text tower has {num_layers} layers but the vision tower has {len(vit_blocks)}; "
                "the dual-stream encoder pairs layer i with layer i"
            )
        if not 0 <= pool_after_layer < num_layers:
            raise ValueError(f"model.pool_after_layer {pool_after_layer} not in [0, {num_layers})")
        if not 1 <= fusion_start_layer <= num_layers:
            raise ValueError(
                f"model.fusion_start_layer {fusion_start_layer} not in [1, {num_layers}] "
                "(layer i reads the keys/values of text layer i - 1)"
            )
        self.pool_after_layer = pool_after_layer
        self.fusion_start_layer = fusion_start_layer
        # train.gradient_checkpointing: keep only each layer's inputs and recompute the layer pair
        # and its OT step in the backward pass (see :meth:`_layer`).
        self.gradient_checkpointing = False
        self.text_layers = nn.ModuleList(
            TextLayer(layer, fuse=i >= fusion_start_layer) for i, layer in enumerate(bert_layers)
        )
        self.vision_layers = nn.ModuleList(VisionLayer(block) for block in vit_blocks)
        self.pooling = pooling
        hidden = pooling.norm.normalized_shape[0]
        # Index i - 1 holds layer i's transport (layer 0 has no earlier state to transport from).
        self.text_transport = self.vision_transport = None
        self.uniform = ot is not None and ot.mode == "uniform"
        if self.uniform:
            self.text_transport = nn.ModuleList(
                UniformTransport(ot.barycentric) for _ in range(num_layers - 1)
            )
            self.vision_transport = nn.ModuleList(
                UniformTransport(ot.barycentric) for _ in range(num_layers - 1)
            )
        elif ot is not None:
            settings = {
                "epsilon": ot.epsilon,
                "iterations": ot.iterations,
                "kernel_floor": ot.kernel_floor,
                "barycentric": ot.barycentric,
                "clamp": ot.clamp,
                "solver": ot.solver,
            }
            self.text_transport = nn.ModuleList(
                MultilevelTransport(hidden, **settings) for _ in range(num_layers - 1)
            )
            self.vision_transport = nn.ModuleList(
                MultilevelTransport(hidden, **settings) for _ in range(num_layers - 1)
            )

    def _layer(
        self,
        i: int,
        text: torch.Tensor,
        vision: torch.Tensor,
        prefix: tuple[torch.Tensor, torch.Tensor] | None,
        prefix_mask: torch.Tensor | None,
        self_mask: torch.Tensor | None,
        boxes: torch.Tensor | None,
        pad_mask: torch.Tensor | None,
        earlier_text: tuple[torch.Tensor, ...],
        earlier_vision: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Layer ``i``: vision layer ``i`` (with the previous text layer's keys/values as
        prefix), the object pooling after ``pool_after_layer``, text layer ``i`` (fused with the
        vision states from ``fusion_start_layer`` on), then each stream's transport from its
        earlier states ``0 .. i-1`` (``model.ot.mode: transport``; the uniform mode's running sums
        are the caller's): the unit of gradient checkpointing. Checkpointed, what it keeps for the
        backward pass is its inputs; the OT's projections of every earlier state (``[B, i T, D]``
        each, the largest activations at paper sizes) are recomputed with the rest."""
        vision = self.vision_layers[i](vision, prefix, prefix_mask)
        if i == self.pool_after_layer:
            vision = self.pooling(vision, boxes)
        fuse = i >= self.fusion_start_layer
        text, keys_values = self.text_layers[i](text, self_mask, vision if fuse else None)
        if self.text_transport is not None and not self.uniform and i >= 1:
            source_mask = None if pad_mask is None else pad_mask.repeat(1, i)
            text = self.text_transport[i - 1](
                text, torch.cat(earlier_text, dim=1), pad_mask, source_mask
            )
            vision = self.vision_transport[i - 1](vision, torch.cat(earlier_vision, dim=1))
        return text, vision, keys_values

    def forward(
        self,
        text: torch.Tensor,
        vision: torch.Tensor,
        boxes: torch.Tensor | None,
        text_mask: torch.Tensor,
        mask_padding: bool,
        has_padding: bool | None = None,
    ) -> EncoderStates:
        """``text`` ``[B, T, D]`` and ``vision`` ``[B, N, D]`` embeddings; ``text_mask`` ``[B, T]``
        bool. ``mask_padding`` False reproduces the original: text padding is masked only in BERT's
        self-attention, and joins prefix attention and OT. ``has_padding``: whether ``text_mask``
        has a False entry, when the caller knows it; None reads the mask, which waits for the
        device and breaks a compiled graph."""
        if has_padding is None:
            has_padding = not bool(text_mask.all())
        self_mask = text_mask[:, None, None, :] if has_padding else None
        pad_mask = text_mask if mask_padding and has_padding else None
        states = EncoderStates(text=[text], vision=[vision])
        uniform = _UniformSources(self, states, pad_mask) if self.uniform else None
        prefix = None
        for i in range(len(self.text_layers)):
            prefix_mask = None
            if prefix is not None and pad_mask is not None:
                vision_keys = pad_mask.new_ones(pad_mask.shape[0], vision.shape[1])
                prefix_mask = torch.cat([pad_mask, vision_keys], dim=1)[:, None, None, :]
            # The source of layer i's OT is states 0 .. i-1: its own input (state i) is left out.
            earlier = (tuple(states.text[:i]), tuple(states.vision[:i]))
            layer = (i, text, vision, prefix, prefix_mask, self_mask, boxes, pad_mask, *earlier)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                text, vision, keys_values = checkpoint(
                    self._layer, *layer, use_reentrant=False, **_recompute_unmonitored(self)
                )
            else:
                text, vision, keys_values = self._layer(*layer)
            prefix = keys_values if i + 1 >= self.fusion_start_layer else None
            if uniform is not None:
                text, vision = uniform.step(i, text, vision)
            states.text.append(text)
            states.vision.append(vision)
        return states
