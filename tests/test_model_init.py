"""How REMOTE's added parts start and behave as the original's: marker embedding rows, PyTorch
default init and Xavier experts (``model.init``), each MoE direction's activation and attention
dropout, no dropout before the classifier, and the pooling LayerNorm's eps."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import transformers
from torch import nn
from transformers import BertConfig, BertModel

from pipeline.config import default_params
from pipeline.model.embeddings import ObjectPooling
from pipeline.model.example import random_batch
from pipeline.model.moe import LayerwiseMoE
from pipeline.model.remote import build_model
from pipeline.model.towers import TINY_TEXT_CONFIG, TINY_VISION_ARGS, load_text_tower
from pipeline.text import MARKERS, load_tokenizer

SLOTS = 4


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def make_model(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(default_params({"data.max_objects": SLOTS, **overrides}), 28, tokenizer)


def test_new_marker_rows_are_independent_normal_draws(tmp_path, tokenizer):
    # A checkpoint without the markers (as on the hub), hidden size 768 so the std is well estimated.
    torch.manual_seed(1)
    config = {**TINY_TEXT_CONFIG, "hidden_size": 768, "num_attention_heads": 12}
    base = len(tokenizer) - len(MARKERS)
    saved = BertModel(BertConfig(vocab_size=base, **config))
    saved.save_pretrained(tmp_path / "bert")
    torch.manual_seed(2)
    model, _ = load_text_tower(str(tmp_path / "bert"), True, len(tokenizer))
    rows = model.get_input_embeddings().weight.detach()
    assert rows.shape == (len(tokenizer), 768)
    assert torch.equal(rows[:base], saved.get_input_embeddings().weight)
    markers = rows[base:]
    # N(0, initializer_range = 0.02), not mean-resized (transformers 5 would give 12 near-equal rows).
    assert abs(markers.std().item() - 0.02) < 0.002 and abs(markers.mean().item()) < 0.002
    distances = torch.cdist(markers, markers)
    off_diagonal = distances[~torch.eye(12, dtype=torch.bool)]
    expected = 0.02 * math.sqrt(2 * 768)  # two independent draws
    assert off_diagonal.min() > 0.8 * expected and off_diagonal.max() < 1.2 * expected
    # Seeded: the same seed draws the same rows.
    torch.manual_seed(2)
    again, _ = load_text_tower(str(tmp_path / "bert"), True, len(tokenizer))
    assert torch.equal(again.get_input_embeddings().weight[base:], markers)


def xavier_std(shape):
    """Xavier-uniform's std with PyTorch's fan rule for a 3-D tensor [J, in, out]."""
    receptive = shape[2]
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    return math.sqrt(2.0 / (fan_in + fan_out))


def test_experts_are_3d_xavier_tensors_without_bias_at_paper_size():
    moe = LayerwiseMoE(768, 12, 13, nn.GELU(), 0.1)
    assert moe.up.shape == (13, 1536, 768) and moe.down.shape == (13, 768, 768)
    assert xavier_std(moe.up.shape) == pytest.approx(0.0013, abs=5e-5)
    assert xavier_std(moe.down.shape) == pytest.approx(0.0018, abs=5e-5)
    for weight, stated in ((moe.up, 0.0013), (moe.down, 0.0018)):
        std = weight.detach().std().item()
        assert abs(std - stated) <= 0.1 * stated
        bound = math.sqrt(3) * xavier_std(weight.shape)  # uniform on [-bound, bound]
        assert weight.abs().max().item() <= bound
        assert weight.abs().max().item() > 0.99 * bound
    # No expert biases: the only biases are the router's and the cross-attentions'.
    biases = {n for n, p in moe.named_parameters() if n.endswith("bias")}
    assert all(n.startswith(("router", "attentions")) for n in biases)
    assert isinstance(moe.router, nn.Linear)


def test_box_projection_is_a_default_linear_at_paper_size():
    pooling = ObjectPooling(768, 8, use_box=True, dropout=0.1)
    weight, bias = pooling.box.weight.detach(), pooling.box.bias.detach()
    assert abs(weight.std().item() - 0.26) <= 0.026  # kaiming_uniform(a=sqrt 5): U(+-1/sqrt 5)
    bound = 1 / math.sqrt(5)
    assert bias.abs().max().item() <= bound and bias.abs().max().item() > 0.95 * bound
    assert bound == pytest.approx(0.45, abs=0.005)


def test_pooling_layer_norm_has_the_originals_eps():
    pooling = ObjectPooling(64, 2, use_box=False, dropout=0.0).eval()
    assert pooling.norm.eps == 1e-12
    # A nearly flat object (variance 1e-8): eps 1e-5 would shrink it ~30x, 1e-12 does not.
    torch.manual_seed(0)
    tokens = 1e-4 * torch.randn(1, 2, 64)
    out = pooling(tokens, None)[0, 0]
    mean = tokens.mean(dim=1)[0]
    centred = mean - mean.mean()
    expected = centred / torch.sqrt(centred.pow(2).mean() + 1e-12)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_each_direction_uses_its_towers_activation_and_attention_dropout(tokenizer):
    model = make_model(tokenizer)
    assert isinstance(model.text_moe.activation, transformers.activations.GELUActivation)
    assert isinstance(model.object_moe.activation, timm.layers.QuickGELU)
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(model.text_moe.activation(x), nn.functional.gelu(x))
    torch.testing.assert_close(model.object_moe.activation(x), x * torch.sigmoid(1.702 * x))
    text_dropout = {a.dropout.p for a in model.text_moe.attentions}
    object_dropout = {a.dropout.p for a in model.object_moe.attentions}
    assert text_dropout == {0.1}  # BERT's attention_probs_dropout_prob
    assert object_dropout == {model.encoder.vision_layers[0].block.attn.attn_drop.p} == {0.0}


def test_each_directions_attention_dropout_is_its_towers_attention_rate(tokenizer, monkeypatch):
    # Rates the defaults leave equal to another (BERT's hidden and attention dropout are both 0.1,
    # CLIP's attention dropout is 0), set apart: each MoE direction takes its tower's attention rate.
    monkeypatch.setitem(TINY_TEXT_CONFIG, "attention_probs_dropout_prob", 0.25)
    monkeypatch.setitem(TINY_VISION_ARGS, "attn_drop_rate", 0.375)
    model = make_model(tokenizer)
    assert {a.dropout.p for a in model.text_moe.attentions} == {0.25}
    assert {a.dropout.p for a in model.object_moe.attentions} == {0.375}


def test_cross_attention_dropout_acts_in_training_and_the_head_has_none(tokenizer):
    model = make_model(tokenizer)
    assert not any(isinstance(m, nn.Dropout) for m in model.head.modules())
    torch.manual_seed(3)
    tokens = torch.randn(2, 3, 64)
    states = [torch.randn(2, 5, 64) for _ in range(5)]
    model.train()
    torch.manual_seed(4)
    a = model.text_moe(tokens, states)
    torch.manual_seed(5)
    b = model.text_moe(tokens, states)
    assert not torch.allclose(a, b)  # attention dropout 0.1
    torch.manual_seed(4)
    c = model.object_moe(tokens, states)
    torch.manual_seed(5)
    assert torch.equal(c, model.object_moe(tokens, states))  # CLIP's attention dropout is 0
    markers, objects = torch.randn(2, 2, 3, 64), torch.randn(2, 2, 64)
    is_object = torch.tensor([[True, False], [False, False]])
    train_logits = model.head(markers, objects, is_object)
    model.eval()
    torch.testing.assert_close(model.head(markers, objects, is_object), train_logits)


def test_expert_computation_is_the_originals_formula(tokenizer):
    model = make_model(tokenizer).eval()
    moe = model.object_moe
    torch.manual_seed(6)
    tokens = torch.randn(2, 3, 64, requires_grad=True)
    states = [torch.randn(2, 5, 64) for _ in range(5)]
    out = moe(tokens, states)
    attended = [att(tokens, s, None) for att, s in zip(moe.attentions, states, strict=True)]
    weights = moe.router(torch.cat([tokens, *attended], dim=-1)).softmax(-1)
    expected = weights[..., :1] * tokens
    for j, a in enumerate(attended):
        pair = torch.cat([tokens, a], dim=-1)
        inner = pair @ moe.up[j]
        expert = tokens + (inner * torch.sigmoid(1.702 * inner)) @ moe.down[j]
        expected = expected + weights[..., j + 1 : j + 2] * expert
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # The tokens' gradient takes every path of the formula (router, cross-attention, experts).
    mix = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * mix).sum(), tokens)
    (expected_grad,) = torch.autograd.grad((expected * mix).sum(), tokens)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["text_moe", "object_moe"])
def test_the_moe_reads_the_other_streams_states_detached(tokenizer, direction):
    # The original detaches every recorded state V_j before its cross-attention: the relation loss
    # reaches the other stream through the encoder only, never back through the MoE.
    moe = getattr(make_model(tokenizer), direction).eval()
    torch.manual_seed(7)
    tokens = torch.randn(2, 3, 64, requires_grad=True)
    states = [torch.randn(2, 5, 64, requires_grad=True) for _ in range(5)]
    out = moe(tokens, states)
    (out * torch.randn_like(out)).sum().backward()
    assert all(state.grad is None for state in states)
    assert tokens.grad.abs().max() > 0 and moe.up.grad.abs().max() > 0
    # The values are those of the undetached computation: only the gradient's path differs.
    torch.testing.assert_close(out, moe(tokens, [s.detach() for s in states]))


def added_linears(model):
    return [
        m for module in model.added_modules() for m in module.modules() if isinstance(m, nn.Linear)
    ]


def test_original_init_keeps_pytorch_defaults_and_normal_init_is_bert_style(tokenizer):
    original = make_model(tokenizer, **{"model.init": "original"})
    normal = make_model(tokenizer, **{"model.init": "normal"})
    # The fusion W_f has a bias, as in the original, in both modes.
    fusion = original.encoder.text_layers[-1].fusion
    assert fusion.bias is not None and fusion.bias.abs().max() > 0
    assert normal.encoder.text_layers[-1].fusion.bias is not None
    for linear in added_linears(original):
        bound = 1 / math.sqrt(linear.in_features)  # nn.Linear's default: U(+-1/sqrt(fan_in))
        assert linear.weight.abs().max() <= bound + 1e-7
        if linear.weight.numel() >= 1000:
            assert abs(linear.weight.std().item() - bound / math.sqrt(3)) < 0.1 * bound
        if linear.bias is not None and linear.bias.numel() >= 16:
            assert linear.bias.abs().max() <= bound and linear.bias.abs().max() > 0.5 * bound
    for linear in added_linears(normal):
        if linear.weight.numel() >= 1000:
            assert abs(linear.weight.std().item() - 0.02) < 0.002
        if linear.bias is not None:
            assert not linear.bias.any()
    for moe in (normal.text_moe, normal.object_moe):
        for weight in (moe.up, moe.down):
            assert abs(weight.std().item() - 0.02) < 0.002 and abs(weight.mean().item()) < 0.002
            # Normal, not uniform: 4.6% of N(0, 0.02) lies beyond 0.04; no Xavier-uniform draw
            # of these shapes does (bound sqrt(3) * 0.021 = 0.037).
            assert 0.035 < (weight.abs() > 0.04).float().mean().item() < 0.056
    # LayerNorms of the added modules: gain 1 and bias 0 in both modes (PyTorch's default).
    for model in (original, normal):
        norms = [
            m
            for module in model.added_modules()
            for m in module.modules()
            if isinstance(m, nn.LayerNorm)
        ]
        assert norms
        for norm in norms:
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
            assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    assert abs(
        original.text_moe.up.std().item() - xavier_std(original.text_moe.up.shape)
    ) < 0.1 * xavier_std(original.text_moe.up.shape)
    # The towers are untouched by model.init: same seed, same tower weights.
    assert torch.equal(
        original.encoder.text_layers[0].layer.attention.self.query.weight,
        normal.encoder.text_layers[0].layer.attention.self.query.weight,
    )
    batch = random_batch(tokenizer, [9, 7], max_objects=SLOTS, seed=0)
    assert torch.isfinite(original.eval()(batch)).all()


def test_normal_init_reaches_every_added_module_at_the_towers_initializer_range(
    tokenizer, monkeypatch
):
    # Named one by one (not through added_modules(), which this pins): the box projection, every
    # fusion W_f, both streams' OT projections, the head, both MoE directions; at the text
    # tower's initializer_range, set away from the 0.02 default.
    monkeypatch.setitem(TINY_TEXT_CONFIG, "initializer_range", 0.05)
    model = make_model(tokenizer, **{"model.init": "normal"})
    encoder = model.encoder
    start = encoder.fusion_start_layer
    modules = {"pooling.box": encoder.pooling.box, "head": model.head}
    modules |= {f"fusion {i}": encoder.text_layers[i].fusion for i in range(start, 4)}
    for stream in ("text_transport", "vision_transport"):
        for i, transport in enumerate(getattr(encoder, stream)):
            modules[f"{stream} {i}"] = transport
    modules |= {"text_moe": model.text_moe, "object_moe": model.object_moe}
    weights, linears = {}, 0
    for name, module in modules.items():
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                linears += 1
                weights.setdefault(name, []).append(sub.weight.detach().flatten())
                if sub.bias is not None:
                    assert not sub.bias.any(), name
    # box, M and classifier, W_f, 3 transports x 2 projections a stream, 5 cross-attentions
    # (q, k, v, o) and a router a direction
    assert linears == 1 + 2 + (4 - start) + 2 * 3 * 2 + 2 * (5 * 4 + 1)
    for name, parts in weights.items():
        std = torch.cat(parts).std().item()
        assert abs(std - 0.05) < 0.1 * 0.05, (name, std)
    for moe in (model.text_moe, model.object_moe):
        for weight in (moe.up, moe.down):
            assert abs(weight.std().item() - 0.05) < 0.05 * 0.05


def test_object_pooling_drops_out_at_model_dropout(tokenizer):
    model = make_model(tokenizer, **{"model.dropout": 0.5})
    pooling = model.encoder.pooling
    torch.manual_seed(8)
    tokens = torch.randn(2, SLOTS * model.object_embeddings.tokens_per_object, 64)
    boxes = torch.rand(2, SLOTS, 5)
    normed = pooling.eval()(tokens, boxes)
    out = pooling.train()(tokens, boxes)
    kept = out != 0
    assert 0.35 < kept.double().mean().item() < 0.65
    torch.testing.assert_close(out[kept], normed[kept] / 0.5, rtol=1e-6, atol=1e-6)
