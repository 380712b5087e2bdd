"""The encoder's layers, the object pooling and the MoE cross-attention against references written
here: plain multi-head attention on explicit weight matrices, per-object loops, float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.model.embeddings import ObjectPatchEmbeddings, ObjectPooling
from pipeline.model.encoder import TextLayer, VisionLayer
from pipeline.model.moe import CrossAttention

HIDDEN, HEADS = 32, 4


def attention(q, k, v, heads, mask=None, keep=None):
    """Plain multi-head attention on ``[B, L, D]`` projections: per batch item and head, a loop.
    ``mask`` ``[B, Lk]`` (True attends); ``keep`` ``[B, H, Lq, Lk]`` multiplies the probabilities
    (a dropout mask, already rescaled). Returns the context ``[B, Lq, D]`` and probabilities."""
    batch, length, hidden = q.shape
    size = hidden // heads
    context = torch.zeros_like(q)
    probs = torch.zeros(batch, heads, length, k.shape[1], dtype=q.dtype)
    for b in range(batch):
        for h in range(heads):
            part = slice(h * size, (h + 1) * size)
            scores = q[b, :, part] @ k[b, :, part].T / math.sqrt(size)
            if mask is not None:
                scores = scores.masked_fill(~mask[b], float("-inf"))
            p = scores.softmax(dim=-1)
            if keep is not None:
                p = p * keep[b, h]
            probs[b, h] = p
            context[b, :, part] = p @ v[b, :, part]
    return context, probs


def linear(x, module):
    return x @ module.weight.T + (module.bias if module.bias is not None else 0)


def layer_norm(x, module):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias


def randomize(module, seed):
    """Random weights everywhere, LayerNorm gains and biases included, so no term hides at 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return module


@pytest.fixture
def bert_layer():
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    config = BertConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=2 * HIDDEN)
    torch.manual_seed(0)
    return BertLayer(config)


@pytest.mark.parametrize("fuse", [False, True])
def test_text_layer_is_bert_attention_plus_the_fusion(bert_layer, fuse):
    layer = randomize(TextLayer(bert_layer, fuse=fuse), seed=1).double().eval()
    torch.manual_seed(2)
    hidden = torch.randn(2, 7, HIDDEN, dtype=torch.float64)
    objects = torch.randn(2, 3, HIDDEN, dtype=torch.float64)
    text_mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    out, (keys, values) = layer(hidden, text_mask[:, None, None, :], objects if fuse else None)

    own = bert_layer.attention.self
    q, k, v = linear(hidden, own.query), linear(hidden, own.key), linear(hidden, own.value)
    context, _ = attention(q, k, v, HEADS, mask=text_mask)
    attended = layer_norm(
        linear(context, bert_layer.attention.output.dense) + hidden,
        bert_layer.attention.output.LayerNorm,
    )
    inner = linear(attended, bert_layer.intermediate.dense)
    if fuse:
        # the context before the output projection reads the objects: softmax(ctx V^T) V, unscaled
        for b in range(2):
            weights = (context[b] @ objects[b].T).softmax(dim=-1)
            inner[b] = inner[b] + linear(weights @ objects[b], layer.fusion)
    inner = F.gelu(inner)
    expected = layer_norm(
        linear(inner, bert_layer.output.dense) + attended, bert_layer.output.LayerNorm
    )
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(keys, k, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(values, v, rtol=1e-12, atol=1e-12)
    if not fuse:  # the unfused layer is the tower's own BERT layer
        own_out = bert_layer(hidden, attention_mask=(~text_mask[:, None, None, :]) * -1e9)
        real = text_mask[:, :, None].expand_as(out)
        torch.testing.assert_close(out[real], own_out[real], rtol=1e-10, atol=1e-10)


@pytest.fixture
def vit_block():
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    return Block(HIDDEN, HEADS, mlp_ratio=2.0, qkv_bias=True)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_vision_layer_is_the_vit_block_with_prefix_keys_and_values(vit_block, with_prefix):
    layer = randomize(VisionLayer(vit_block), seed=3).double().eval()
    torch.manual_seed(4)
    hidden = torch.randn(2, 6, HIDDEN, dtype=torch.float64)
    prefix = mask = None
    if with_prefix:
        prefix = (
            torch.randn(2, 5, HIDDEN, dtype=torch.float64),
            torch.randn(2, 5, HIDDEN, dtype=torch.float64),
        )
        text_real = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
        mask = torch.cat([text_real, torch.ones(2, 6, dtype=torch.bool)], dim=1)
    out = layer(hidden, prefix, None if mask is None else mask[:, None, None, :])

    block = vit_block
    x = layer_norm(hidden, block.norm1)
    qkv = linear(x, block.attn.qkv)
    q, k, v = qkv[..., :HIDDEN], qkv[..., HIDDEN : 2 * HIDDEN], qkv[..., 2 * HIDDEN :]
    if with_prefix:  # the text layer's keys and values come first, per head
        k, v = torch.cat([prefix[0], k], dim=1), torch.cat([prefix[1], v], dim=1)
    context, _ = attention(q, k, v, HEADS, mask=mask)
    hidden2 = hidden + linear(context, block.attn.proj)
    mlp = block.mlp
    expected = hidden2 + linear(F.gelu(linear(layer_norm(hidden2, block.norm2), mlp.fc1)), mlp.fc2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if not with_prefix:  # without a prefix it is timm's own block
        torch.testing.assert_close(out, block(hidden), rtol=1e-10, atol=1e-10)


def test_vision_layer_keeps_the_blocks_qk_norm_layer_scale_and_eval_mode():
    # The parts a CLIP block leaves as identities or at rate 0 (so the test above cannot see
    # them): per-head q/k LayerNorms, the attention output norm, LayerScale, attention dropout.
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(
        HIDDEN,
        HEADS,
        mlp_ratio=2.0,
        qkv_bias=True,
        qk_norm=True,
        scale_attn_norm=True,
        attn_drop=0.5,
        proj_drop=0.5,
        init_values=0.5,
    )
    layer = randomize(VisionLayer(block), seed=9).double().eval()
    hidden = torch.randn(2, 6, HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(layer(hidden), block(hidden), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("use_box", [False, True])
def test_object_pooling_is_the_mean_plus_the_box_then_layer_norm(use_box):
    pooling = randomize(ObjectPooling(HIDDEN, 8, use_box=use_box, dropout=0.1), seed=5)
    pooling = pooling.double().eval()
    torch.manual_seed(6)
    tokens = torch.randn(2, 3 * 8, HIDDEN, dtype=torch.float64)
    boxes = torch.rand(2, 3, 5, dtype=torch.float64)
    out = pooling(tokens, boxes if use_box else None)
    expected = torch.empty(2, 3, HIDDEN, dtype=torch.float64)
    for b in range(2):
        for slot in range(3):
            vector = tokens[b, 8 * slot : 8 * slot + 8].sum(dim=0) / 8
            if use_box:
                vector = vector + pooling.box.weight @ boxes[b, slot] + pooling.box.bias
            centred = vector - vector.mean()
            scale = torch.sqrt((centred**2).mean() + 1e-12)
            expected[b, slot] = centred / scale * pooling.norm.weight + pooling.norm.bias
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def small_vit(architecture: str, **kwargs):
    """A timm ViT of ``architecture`` at 32 wide, patch 32: CLIP's has no patch bias and a
    pre-LayerNorm, the plain ViT a patch bias and no pre-norm."""
    import timm

    vit = timm.create_model(
        architecture,
        pretrained=False,
        num_classes=0,
        embed_dim=HIDDEN,
        depth=1,
        num_heads=4,
        **kwargs,
    )
    return randomize(vit, seed=11).double()


def patch_embeddings_reference(module, pixels, depth, depth_embedding, pre_norm=True):
    """The tokens of ``[B, P, 3, 64, 64]`` crops and ``[B, P, 64, 64]`` depth, patch by patch: each
    32x32 patch flattened times the flattened convolution weights, plus the bias and the patch's
    position, then (``pre_norm``) the pre-norm (a LayerNorm written out, or none). A tower whose
    patch embedding has its own norm applies it to each patch's product, before the position."""
    rgb_w = module.rgb_patch.weight.reshape(HIDDEN, -1)
    rgb_b = module.rgb_patch.bias
    depth_w = depth_b = None
    if depth is not None:
        depth_w = module.depth_patch.weight.reshape(HIDDEN, -1)
        depth_b = module.depth_patch.bias

    def patch_norm(x):
        return (
            layer_norm(x, module.patch_norm) if isinstance(module.patch_norm, nn.LayerNorm) else x
        )

    batch, slots = pixels.shape[:2]
    out = []
    for b in range(batch):
        for slot in range(slots):
            rgb_tokens, depth_tokens = [], []
            for k, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
                cut = (slice(32 * row, 32 * row + 32), slice(32 * col, 32 * col + 32))
                rgb = rgb_w @ pixels[b, slot][(slice(None), *cut)].reshape(-1)
                rgb = rgb + (rgb_b if rgb_b is not None else 0)
                position = module.position[0, k]
                if depth is None:
                    rgb_tokens.append(patch_norm(rgb) + position)
                    continue
                dep = depth_w @ depth[b, slot][cut].reshape(-1)
                dep = dep + (depth_b if depth_b is not None else 0)
                if depth_embedding == "channel":
                    rgb_tokens.append(patch_norm(rgb + dep) + position)
                else:
                    rgb_tokens.append(patch_norm(rgb) + position)
                    depth_tokens.append(patch_norm(dep) + position)
            out += rgb_tokens + depth_tokens
    tokens = torch.stack(out).reshape(batch, -1, HIDDEN)
    if pre_norm and isinstance(module.pre_norm, nn.LayerNorm):
        tokens = layer_norm(tokens, module.pre_norm)
    return tokens


ARCHITECTURES = ["vit_base_patch32_clip_quickgelu_224", "vit_base_patch32_224"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("depth_embedding", ["tokens", "channel", None])
def test_object_patch_embeddings_are_patch_products_plus_positions(architecture, depth_embedding):
    vit = small_vit(architecture)
    use_depth = depth_embedding is not None
    module = ObjectPatchEmbeddings(vit, 64, use_depth, depth_embedding or "tokens").double()
    assert isinstance(module.pre_norm, nn.LayerNorm) == ("clip" in architecture)
    if use_depth:  # init: the RGB mean of the patch weights; one bias when depth is a channel
        torch.testing.assert_close(
            module.depth_patch.weight, vit.patch_embed.proj.weight.mean(dim=1, keepdim=True)
        )
        has_bias = vit.patch_embed.proj.bias is not None and depth_embedding == "tokens"
        assert (module.depth_patch.bias is not None) == has_bias
        if has_bias:
            torch.testing.assert_close(module.depth_patch.bias, vit.patch_embed.proj.bias)
        randomize(module.depth_patch, seed=12)  # trained weights: no longer the RGB mean
    torch.manual_seed(13)
    pixels = torch.randn(2, 3, 3, 64, 64, dtype=torch.float64)
    depth = torch.rand(2, 3, 64, 64, dtype=torch.float64) * 10 if use_depth else None
    out = module(pixels, depth)
    per_object = {"tokens": 8, "channel": 4, None: 4}[depth_embedding]
    assert module.tokens_per_object == per_object and out.shape == (2, 3 * per_object, HIDDEN)
    expected = patch_embeddings_reference(module, pixels, depth, depth_embedding)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    # Before the pre-norm, per crop; the last patches_per_crop are the depth (or RGB-D) ones.
    raw = module.patch_tokens(pixels, depth)
    assert module.patches_per_crop == 4 and raw.shape == (6, per_object, HIDDEN)
    unnormed = patch_embeddings_reference(module, pixels, depth, depth_embedding, pre_norm=False)
    torch.testing.assert_close(raw.reshape(2, -1, HIDDEN), unnormed, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("depth_embedding", ["tokens", "channel", None])
def test_a_towers_patch_norm_normalizes_each_patch_before_its_position(depth_embedding):
    vit = small_vit(ARCHITECTURES[1], embed_norm_layer="layernorm")
    assert isinstance(vit.patch_embed.norm, nn.LayerNorm)
    use_depth = depth_embedding is not None
    module = ObjectPatchEmbeddings(vit, 64, use_depth, depth_embedding or "tokens").double()
    assert module.patch_norm is vit.patch_embed.norm
    if use_depth:
        randomize(module.depth_patch, seed=12)
    torch.manual_seed(14)
    pixels = torch.randn(2, 2, 3, 64, 64, dtype=torch.float64)
    depth = torch.rand(2, 2, 64, 64, dtype=torch.float64) * 10 if use_depth else None
    expected = patch_embeddings_reference(module, pixels, depth, depth_embedding)
    torch.testing.assert_close(module(pixels, depth), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_positions_are_a_copy_of_the_towers_patch_grid_without_its_class_position(no_embed_class):
    # A 64-pixel tower with patch 32 has the crops' own 2x2 grid, so nothing is resampled. A tower
    # without a class position (no_embed_class, as DeiT III) has only the grid.
    vit = small_vit(ARCHITECTURES[1], img_size=64, no_embed_class=no_embed_class)
    before = vit.pos_embed.detach().clone()
    assert before.shape[1] == (4 if no_embed_class else 5)
    module = ObjectPatchEmbeddings(vit, 64, use_depth=False)
    torch.testing.assert_close(module.position, before[:, -4:], rtol=0, atol=0)
    with torch.no_grad():
        module.position.add_(1.0)  # as a training step would: the tower's grid is not shared
    assert torch.equal(vit.pos_embed, before)


def test_object_patch_embeddings_refuse_an_unknown_depth_mode_and_a_crop_off_the_patch_grid():
    vit = small_vit(ARCHITECTURES[0])
    with pytest.raises(
        ValueError, match="model.depth_embedding 'pixels': expected one of 'tokens', 'channel'$"
    ):
        ObjectPatchEmbeddings(vit, 64, True, "pixels")
    with pytest.raises(
        ValueError,
        match="features.crop_size 48 is not a multiple of the vision tower's patch size 32",
    ):
        ObjectPatchEmbeddings(vit, 48, False)


def test_float32_depth_and_boxes_join_a_module_of_another_dtype():
    # Batches hold float32 depth and boxes whatever dtype the model runs in.
    module = ObjectPatchEmbeddings(small_vit(ARCHITECTURES[0]), 64, True, "tokens").double()
    torch.manual_seed(15)
    pixels = torch.randn(1, 2, 3, 64, 64, dtype=torch.float64)
    depth = torch.rand(1, 2, 64, 64)
    tokens = module(pixels, depth)
    assert tokens.dtype == torch.float64 and torch.equal(tokens, module(pixels, depth.double()))
    pooling = randomize(ObjectPooling(HIDDEN, 8, use_box=True, dropout=0.0), seed=5).double()
    boxes = torch.rand(1, 2, 5)
    objects = pooling.eval()(tokens, boxes)
    assert objects.dtype == torch.float64 and torch.equal(objects, pooling(tokens, boxes.double()))


def test_object_pooling_drops_out_after_the_layer_norm():
    pooling = randomize(ObjectPooling(HIDDEN, 8, use_box=True, dropout=0.5), seed=5).double()
    torch.manual_seed(16)
    tokens = torch.randn(2, 3 * 8, HIDDEN, dtype=torch.float64)
    boxes = torch.rand(2, 3, 5, dtype=torch.float64)
    normed = pooling.eval()(tokens, boxes)
    out = pooling.train()(tokens, boxes)
    kept = out != 0  # dropout zeros whole entries of the normalized objects, scales the rest
    assert 0.3 < kept.double().mean().item() < 0.7
    torch.testing.assert_close(out[kept], normed[kept] / 0.5, rtol=1e-12, atol=1e-12)


def test_own_depth_tokens_lose_a_flat_regions_depth_level_and_a_depth_channel_keeps_it():
    """The original's quirk, in numbers: a constant-depth crop's own tokens are LayerNormed alone,
    so once depth times the convolution outweighs the position embedding, the level is gone."""
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 2, 3, 64, 64, dtype=torch.float64, generator=generator)
    flat = torch.ones(1, 2, 64, 64, dtype=torch.float64)
    changes = {}
    for depth_embedding in ("tokens", "channel"):
        module = ObjectPatchEmbeddings(small_vit(ARCHITECTURES[0]), 64, True, depth_embedding)
        module = module.double()
        with torch.no_grad():
            module.position.mul_(0.02 / module.position.std())  # an initial ViT's scale
        near, far = module(pixels, flat * 10.0), module(pixels, flat * 1.5)
        depth_part = slice(4, 8) if depth_embedding == "tokens" else slice(0, 4)
        changes[depth_embedding] = (near - far)[:, depth_part].abs().max().item()
        if depth_embedding == "tokens":  # the RGB tokens do not see depth at all
            torch.testing.assert_close(near[:, :4], far[:, :4])
    assert changes["tokens"] < 0.05 < changes["channel"]


class FixedDropout(nn.Module):
    """Multiplies by a given mask (rescaled like dropout's): the same mask for the module and the
    reference."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.keep = keep

    def forward(self, x):
        return x * self.keep.reshape(x.shape)


@pytest.mark.parametrize("training", [False, True])
def test_moe_cross_attention_is_plain_attention_with_dropout_on_the_probabilities(training):
    cross = randomize(CrossAttention(HIDDEN, HEADS, attention_dropout=0.5), seed=7).double()
    torch.manual_seed(8)
    queries = torch.randn(2, 3, HIDDEN, dtype=torch.float64)
    state = torch.randn(2, 9, HIDDEN, dtype=torch.float64)
    state_mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    keep = None
    if training:
        # probabilities are [B, H * N, M]: head-major, as the reference's [B, H, N, M]
        keep = (torch.rand(2, HEADS, 3, 9) > 0.5).double() / 0.5
        cross.dropout = FixedDropout(keep)
    cross.train(training)
    out = cross(queries, state, state_mask)

    q = linear(queries, cross.query)
    k = state @ cross.key.weight.T  # a key bias would shift each query's scores alike: none
    v = linear(state, cross.value)
    context, _ = attention(q, k, v, HEADS, mask=state_mask, keep=keep)
    expected = layer_norm(linear(context, cross.output), cross.norm)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


class FixedAttention:
    """Stands in for ``F.scaled_dot_product_attention`` in the encoder: plain attention whose
    dropout multiplies the probabilities by a fixed mask drawn at the *rate it is given*
    (``keep_mask``), so a test can tell which rate, if any, a layer asked for."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def scaled_dot_product_attention(self, q, k, v, attn_mask=None, dropout_p=0.0):
        self.rates.append(dropout_p)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        if dropout_p > 0:
            probs = probs * keep_mask(probs.shape, dropout_p)
        return probs @ v


def keep_mask(shape, rate):
    """A dropout mask ``[B, H, Lq, Lk]`` at ``rate``, rescaled, the same for a given shape."""
    generator = torch.Generator().manual_seed(17)
    return (torch.rand(shape, generator=generator) >= rate).double() / (1 - rate)


def test_text_layer_drops_attention_probabilities_at_the_towers_rate_in_training(monkeypatch):
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    import pipeline.model.encoder as encoder_module

    config = BertConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN,
        attention_probs_dropout_prob=0.25,
        hidden_dropout_prob=0.0,  # only the attention probabilities are dropped here
    )
    torch.manual_seed(0)
    bert_layer = BertLayer(config)
    layer = randomize(TextLayer(bert_layer, fuse=False), seed=1).double()
    fixed = FixedAttention()
    monkeypatch.setattr(encoder_module, "F", fixed)
    hidden = torch.randn(2, 7, HIDDEN, dtype=torch.float64)
    text_mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    out, _ = layer.train()(hidden, text_mask[:, None, None, :])

    own = bert_layer.attention.self
    q, k, v = linear(hidden, own.query), linear(hidden, own.key), linear(hidden, own.value)
    keep = keep_mask((2, HEADS, 7, 7), 0.25)
    context, _ = attention(q, k, v, HEADS, mask=text_mask, keep=keep)
    attended = layer_norm(
        linear(context, bert_layer.attention.output.dense) + hidden,
        bert_layer.attention.output.LayerNorm,
    )
    inner = F.gelu(linear(attended, bert_layer.intermediate.dense))
    expected = layer_norm(
        linear(inner, bert_layer.output.dense) + attended, bert_layer.output.LayerNorm
    )
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    layer.eval()(hidden, text_mask[:, None, None, :])
    assert fixed.rates == [0.25, 0.0]  # BERT's attention_probs_dropout_prob, then eval: none


def test_vision_layer_drops_attention_probabilities_at_the_blocks_rate_in_training(
    monkeypatch,
):
    # The prefix keys join the dropped probabilities: the mask spans text and vision keys.
    from timm.models.vision_transformer import Block

    import pipeline.model.encoder as encoder_module

    torch.manual_seed(0)
    block = Block(HIDDEN, HEADS, mlp_ratio=2.0, qkv_bias=True, attn_drop=0.375)
    layer = randomize(VisionLayer(block), seed=3).double()
    fixed = FixedAttention()
    monkeypatch.setattr(encoder_module, "F", fixed)
    hidden = torch.randn(2, 6, HIDDEN, dtype=torch.float64)
    prefix = (
        torch.randn(2, 5, HIDDEN, dtype=torch.float64),
        torch.randn(2, 5, HIDDEN, dtype=torch.float64),
    )
    text_real = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    mask = torch.cat([text_real, torch.ones(2, 6, dtype=torch.bool)], dim=1)
    out = layer.train()(hidden, prefix, mask[:, None, None, :])

    qkv = linear(layer_norm(hidden, block.norm1), block.attn.qkv)
    q, k, v = qkv[..., :HIDDEN], qkv[..., HIDDEN : 2 * HIDDEN], qkv[..., 2 * HIDDEN :]
    k, v = torch.cat([prefix[0], k], dim=1), torch.cat([prefix[1], v], dim=1)
    context, _ = attention(q, k, v, HEADS, mask=mask, keep=keep_mask((2, HEADS, 6, 11), 0.375))
    hidden2 = hidden + linear(context, block.attn.proj)
    mlp = block.mlp
    expected = hidden2 + linear(F.gelu(linear(layer_norm(hidden2, block.norm2), mlp.fc1)), mlp.fc2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    layer.eval()(hidden, prefix, mask[:, None, None, :])
    assert fixed.rates == [0.375, 0.0]


def test_prefix_keys_skip_the_vision_blocks_key_norm():
    # A block with per-head q/k LayerNorms normalizes its own queries and keys only: the text
    # layer's keys join as they were computed.
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(HIDDEN, HEADS, mlp_ratio=2.0, qkv_bias=True, qk_norm=True)
    layer = randomize(VisionLayer(block), seed=9).double().eval()
    torch.manual_seed(10)
    hidden = torch.randn(2, 6, HIDDEN, dtype=torch.float64)
    prefix = (
        torch.randn(2, 5, HIDDEN, dtype=torch.float64),
        torch.randn(2, 5, HIDDEN, dtype=torch.float64),
    )
    out = layer(hidden, prefix)

    size = HIDDEN // HEADS

    def per_head_norm(x, module):  # [B, L, D] -> each head's slice LayerNormed
        return layer_norm(x.reshape(*x.shape[:2], HEADS, size), module).reshape(x.shape)

    qkv = linear(layer_norm(hidden, block.norm1), block.attn.qkv)
    q, k, v = qkv[..., :HIDDEN], qkv[..., HIDDEN : 2 * HIDDEN], qkv[..., 2 * HIDDEN :]
    q, k = per_head_norm(q, block.attn.q_norm), per_head_norm(k, block.attn.k_norm)
    k, v = torch.cat([prefix[0], k], dim=1), torch.cat([prefix[1], v], dim=1)
    context, _ = attention(q, k, v, HEADS)
    hidden2 = hidden + linear(context, block.attn.proj)
    mlp = block.mlp
    expected = hidden2 + linear(F.gelu(linear(layer_norm(hidden2, block.norm2), mlp.fc1)), mlp.fc2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_layers_and_the_encoder_refuse_what_they_cannot_pair(bert_layer, vit_block):
    from timm.layers import Attention
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    from pipeline.model.encoder import DualStreamEncoder

    decoder = BertConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN,
        is_decoder=True,
        add_cross_attention=True,
    )
    with pytest.raises(ValueError, match="BERT layers with cross-attention are not supported"):
        TextLayer(BertLayer(decoder), fuse=False)
    from timm.models.vision_transformer import Block

    gated = Block(HIDDEN, HEADS, mlp_ratio=2.0, qkv_bias=True)
    gated.attn = Attention(HIDDEN, HEADS, qkv_bias=True, gated=True)  # Block has no such switch
    with pytest.raises(ValueError, match="block type Block is not supported"):
        VisionLayer(gated)

    pooling = ObjectPooling(HIDDEN, 8, use_box=False, dropout=0.0)

    def encoder(texts, visions, pool_after, fusion_start):
        return DualStreamEncoder(
            [bert_layer] * texts,
            [vit_block] * visions,
            pooling,
            pool_after_layer=pool_after,
            fusion_start_layer=fusion_start,
            ot=None,
        )

    for visions in (2, 4):
        with pytest.raises(ValueError, match=f"3 layers but the vision tower has {visions}"):
            encoder(3, visions, 1, 2)
    # Pooling after a layer that does not exist would leave the objects unpooled.
    with pytest.raises(ValueError, match=r"model.pool_after_layer 3 not in \[0, 3\)"):
        encoder(3, 3, 3, 2)
    # Layer 0 has no text layer before it to take keys/values from.
    with pytest.raises(ValueError, match=r"model.fusion_start_layer 0 not in \[1, 3\]"):
        encoder(3, 3, 1, 0)
    assert encoder(3, 3, 2, 3).fusion_start_layer == 3  # the last layer fuses; still valid
