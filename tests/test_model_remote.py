"""The REMOTE model end to end on tiny towers: the encoder against its layers run in the designed
order, padding invariance, the vectorized head against a per-sample loop, gradients reaching every
parameter (default and ablations), rebuilding from ``model_config``, and overfitting a small
batch."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.nn import functional as F

from pipeline.config import default_params
from pipeline.model.config import RemoteConfig
from pipeline.model.example import random_batch
from pipeline.model.ot import MultilevelTransport, UniformTransport
from pipeline.model.regime import record_regime, regime_summary
from pipeline.model.remote import RemoteModel, build_model
from pipeline.text import load_tokenizer

SLOTS = 4  # object slots in these tests (the paper's 12 only makes them slower)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def make_model(tokenizer, seed: int = 0, **overrides) -> RemoteModel:
    params = default_params({"data.max_objects": SLOTS, **overrides})
    torch.manual_seed(seed)
    return build_model(params, 28, tokenizer)


def make_batch(tokenizer, lengths, seed=0, **kwargs):
    return random_batch(tokenizer, lengths, max_objects=SLOTS, seed=seed, **kwargs)


def select(batch, index: list[int], width: int):
    """Samples ``index`` of ``batch`` with their texts cut or padded to ``width``."""
    out = {k: v[index] for k, v in batch.items()}
    length = batch["attention_mask"].shape[1]
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        value = out[key][:, :width]
        if width > length:
            value = F.pad(value, (0, width - length))  # pad id, segment and mask are all 0
        out[key] = value
    return out


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("solver", ["log_sinkhorn", "fused"])
def test_logits_do_not_depend_on_padding_with_pad_to_max_false(tokenizer, solver):
    model = make_model(tokenizer, **{"data.pad_to_max": False, "model.ot.solver": solver}).eval()
    batch = make_batch(tokenizer, [6, 9, 25, 12, 7, 30])
    with torch.no_grad():
        together = model(batch)
        for b in (0, 1, 3):
            width = int(batch["attention_mask"][b].sum())
            alone = model(select(batch, [b], width))[0]
            assert rel_err(together[b], alone) <= 1e-5
            longer = model(select(batch, [b, 5], width + 40))[0]
            assert rel_err(longer, alone) <= 1e-5


def test_padding_changes_logits_in_the_paper_mode(tokenizer):
    # pad_to_max=true reproduces the original: padding joins OT, prefix attention and the MoE.
    model = make_model(tokenizer, **{"data.pad_to_max": True}).eval()
    batch = make_batch(tokenizer, [6, 9, 12])
    with torch.no_grad():
        short = model(batch)
        padded = model(select(batch, [0, 1, 2], batch["input_ids"].shape[1] + 20))
    assert rel_err(padded, short) > 1e-3


def encoder_reference(model, text, vision, boxes, text_mask, mask_padding, transports):
    """DESIGN.md's dual-stream encoder written out with its (separately tested) layers: per layer
    ``i``, vision layer ``i`` with text layer ``i - 1``'s keys/values first from the fusion layer on,
    the object pooling after ``pool_after_layer``, text layer ``i`` fused with the current objects
    from the fusion layer on, then (``i >= 1``) each stream's OT from its states ``0 .. i-1``.
    ``transports``: (text, vision) lists, layer ``i``'s at ``i - 1``. Returns both state lists."""
    encoder, config = model.encoder, model.config
    pool_after, fusion_start = config.pool_after_layer, config.fusion_start_layer
    pad = text_mask if mask_padding else None
    texts, visions, exported = [text], [vision], []
    for i in range(len(encoder.text_layers)):
        prefix = prefix_mask = None
        if i >= fusion_start:
            prefix = exported[i - 1]
            if pad is not None:  # the text's padded keys are masked, every vision key attends
                vision_keys = torch.ones(vision.shape[:2], dtype=torch.bool)
                prefix_mask = torch.cat([pad, vision_keys], dim=1)[:, None, None, :]
        vision = encoder.vision_layers[i](vision, prefix, prefix_mask)
        if i == pool_after:
            vision = encoder.pooling(vision, boxes)
        objects = vision if i >= fusion_start else None
        text, keys_values = encoder.text_layers[i](text, text_mask[:, None, None, :], objects)
        exported.append(keys_values)
        if i >= 1:
            source_mask = None if pad is None else torch.cat([pad] * i, dim=1)
            text = transports[0][i - 1](text, torch.cat(texts[:i], dim=1), pad, source_mask)
            vision = transports[1][i - 1](vision, torch.cat(visions[:i], dim=1))
        texts.append(text)
        visions.append(vision)
    return texts, visions


# model.ot settings, each written out for the reference's own transport modules: the defaults,
# then each setting away from them (a kernel where both exp(-C/eps) and the floor count, and few
# iterations, so each one shows), and the uniform mode.
ENCODER_OT = {
    "default": {
        "epsilon": 0.5,
        "iterations": 50,
        "kernel_floor": 1e-12,
        "barycentric": False,
        "clamp": 1e-8,
        "solver": "fused",
    },
    "log-barycentric": {
        "epsilon": 1.0,
        "iterations": 2,
        "kernel_floor": 1e-5,
        "barycentric": True,
        "clamp": 0.0,
        "solver": "log_sinkhorn",
    },
    "uniform-barycentric": {"mode": "uniform", "barycentric": True},
}


@pytest.mark.parametrize("mask_padding", [False, True])
@pytest.mark.parametrize("ot", list(ENCODER_OT))
def test_encoder_equals_its_layers_run_in_the_designed_order(tokenizer, ot, mask_padding):
    settings = ENCODER_OT[ot]
    model = make_model(tokenizer, **{f"model.ot.{k}": v for k, v in settings.items()}).eval()
    encoder, hidden = model.encoder, model.config.text["bert_config"]["hidden_size"]
    transports = []
    for stream in (encoder.text_transport, encoder.vision_transport):
        if ot.startswith("uniform"):
            fresh = [UniformTransport(settings["barycentric"]) for _ in stream]
        else:
            fresh = [MultilevelTransport(hidden, **settings) for _ in stream]
        transports.append(torch.nn.ModuleList(fresh).eval())
        transports[-1].load_state_dict(stream.state_dict())
    generator = torch.Generator().manual_seed(21)
    tokens = SLOTS * model.object_embeddings.tokens_per_object
    text = torch.randn(3, 10, hidden, generator=generator)
    vision = torch.randn(3, tokens, hidden, generator=generator)
    boxes = torch.rand(3, SLOTS, 5, generator=generator)
    text_mask = torch.arange(10)[None, :] < torch.tensor([[10], [7], [4]])
    with torch.no_grad():
        states = encoder(text, vision, boxes, text_mask, mask_padding)
        texts, visions = encoder_reference(
            model, text, vision, boxes, text_mask, mask_padding, transports
        )
    assert len(states.text) == len(states.vision) == len(encoder.text_layers) + 1
    for got, expected in ((states.text, texts), (states.vision, visions)):
        for layer, (a, b) in enumerate(zip(got, expected, strict=True)):
            message = lambda m, layer=layer: f"state {layer}: {m}"  # noqa: E731
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=message)


def test_encoder_inputs_are_the_bert_embeddings_with_segments_and_the_object_tokens(tokenizer):
    model = make_model(tokenizer).eval()
    batch = make_batch(tokenizer, [8, 12, 10])
    assert batch["token_type_ids"].any()  # the caption segment
    with torch.no_grad():
        states = model.encode(batch)
    embeddings = model.text_embeddings
    ids, segments = batch["input_ids"], batch["token_type_ids"]
    positions = torch.arange(ids.shape[1])
    summed = (
        embeddings.word_embeddings.weight[ids]
        + embeddings.position_embeddings.weight[positions]
        + embeddings.token_type_embeddings.weight[segments]
    )
    norm = embeddings.LayerNorm
    centred = summed - summed.mean(-1, keepdim=True)
    variance = centred.pow(2).mean(-1, keepdim=True)
    text = centred / torch.sqrt(variance + norm.eps) * norm.weight + norm.bias
    torch.testing.assert_close(states.text[0], text, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        objects = model.object_embeddings(batch["pixel_values"], batch["depth_values"])
    torch.testing.assert_close(states.vision[0], objects, rtol=0, atol=0)


def loop_logits(model: RemoteModel, batch) -> torch.Tensor:
    """The head as a per-sample Python loop over full final states (MoE run on every token); the
    object MoE masks text padding only when padding is masked (``data.pad_to_max: false``)."""
    states = model.encode(batch)
    text, objects = states.text[-1], states.vision[-1]
    if model.text_moe is not None:
        mask = batch["attention_mask"].bool() if model.mask_padding else None
        text = model.text_moe(text, states.vision)
        objects = model.object_moe(objects, states.text, mask)
    zero = torch.zeros(text.shape[-1])
    logits = []
    for b in range(len(batch["input_ids"])):
        pair = []
        for entity in range(2):
            s, k, o = batch["marker_pos"][b, entity].tolist()
            slot = int(batch["object_slot"][b, entity])
            if slot >= 0:
                first, second = objects[b, slot], text[b, o] if o >= 0 else zero
            else:
                first = text[b, s] if s >= 0 else zero
                second = text[b, k] if k >= 0 else zero
            if model.head.entity is None:
                pair.append(first)
            else:
                pair.append(model.head.entity(torch.cat([first, second])))
        logits.append(model.head.classifier(torch.cat(pair)))
    return torch.stack(logits)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"data.pad_to_max": False},
        {"data.pad_to_max": True},
        {"model.moe.enabled": False},
        {"data.use_caption": False, "model.head.project_without_caption": False},
    ],
    ids=["default", "masked", "paper", "no-moe", "raw-without-caption"],
)
def test_vectorized_head_equals_per_sample_loop(tokenizer, overrides):
    model = make_model(tokenizer, **overrides).eval()
    use_caption = overrides.get("data.use_caption", True)
    batch = make_batch(tokenizer, [8, 12, 10, 15, 9, 11, 7, 13, 14], use_caption=use_caption)
    # Truncated markers (-1) of every kind: a text head's <s>, a text tail's <k>, an object's <o>.
    batch["marker_pos"][3, 0, 0] = -1
    batch["marker_pos"][4, 0, 1] = -1
    batch["marker_pos"][5, 1, 2] = -1
    batch["marker_pos"][7, 1, 2] = -1
    with torch.no_grad():
        vectorized = model(batch)
        looped = loop_logits(model, batch)
    assert rel_err(vectorized, looped) <= 1e-5
    # Truncation is visible: the same batch without it gives other logits for those samples.
    intact = make_batch(tokenizer, [8, 12, 10, 15, 9, 11, 7, 13, 14], use_caption=use_caption)
    with torch.no_grad():
        changed = (model(intact) - vectorized).abs().amax(dim=1) > 1e-4
    # Without captions there are no <k>/<o> markers to truncate; only the <s> of sample 3 counts.
    expected = [3, 4, 5, 7] if use_caption else [3]
    assert changed.nonzero().flatten().tolist() == expected


def analytically_zero(model: RemoteModel) -> set[str]:
    """BERT key biases shift all of a query's scores equally, so their gradient is zero unless the
    keys also serve as prefix keys of the next vision layer (mixed with the ViT's own keys)."""
    encoder = model.encoder
    last = len(encoder.text_layers) - 1
    return {
        f"encoder.text_layers.{i}.layer.attention.self.key.bias"
        for i in range(len(encoder.text_layers))
        if not (encoder.fusion_start_layer - 1 <= i < last)
    }


ABLATIONS = {
    "default": {},
    "masked": {"data.pad_to_max": False},
    "no-ot": {"model.ot.enabled": False},
    "uniform-ot": {"model.ot.mode": "uniform"},
    "uniform-ot-masked": {"model.ot.mode": "uniform", "data.pad_to_max": False},
    "no-moe": {"model.moe.enabled": False},
    "no-depth": {"data.use_depth": False},
    "depth-channel": {"model.depth_embedding": "channel"},
    "no-box": {"data.use_box": False},
    "no-caption": {"data.use_caption": False},
    "no-caption-raw": {"data.use_caption": False, "model.head.project_without_caption": False},
    "pure-ot-barycentric": {
        "model.ot.kernel_floor": 0.0,
        "model.ot.barycentric": True,
        "model.ot.solver": "log_sinkhorn",  # plain-domain solvers need a floor
    },
    "plain-domain-solver": {"model.ot.solver": "sinkhorn", "data.pad_to_max": False},
    "fused-solver": {"model.ot.solver": "fused", "data.pad_to_max": False},
    "late-fusion": {"model.pool_after_layer": 2, "model.fusion_start_layer": 3},
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_parameter_gets_a_gradient(tokenizer, name):
    overrides = {"model.ot.iterations": 20, **ABLATIONS[name]}
    model = make_model(tokenizer, **overrides).train()
    use_caption = overrides.get("data.use_caption", True)
    batch = make_batch(tokenizer, [8, 12, 10, 9, 11, 7], use_caption=use_caption)
    loss = F.cross_entropy(model(batch), batch["labels"])
    loss.backward()
    zero = analytically_zero(model)
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name}: no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name}: non-finite gradient"
        scale = param.grad.abs().max().item()
        if param_name in zero:
            assert scale < 1e-6, f"{param_name}: expected an (analytically) zero gradient"
        else:
            assert scale > 0, f"{param_name}: zero gradient"


def test_only_used_modules_are_built(tokenizer):
    names = lambda model: {n for n, _ in model.named_parameters()}  # noqa: E731
    full = make_model(tokenizer)
    assert any("depth_patch" in n for n in names(full))
    assert any("pooling.box" in n for n in names(full))
    assert not any("pooler" in n or "cls_token" in n for n in names(full))
    layers = len(full.encoder.text_layers)
    start = full.encoder.fusion_start_layer
    assert [layer.fusion is not None for layer in full.encoder.text_layers] == [
        i >= start for i in range(layers)
    ]
    assert len(full.encoder.text_transport) == len(full.encoder.vision_transport) == layers - 1
    assert len(full.text_moe.attentions) == layers + 1
    assert all(a.key.bias is None for a in full.text_moe.attentions)
    checks = {
        "data.use_depth": "depth_patch",
        "data.use_box": "pooling.box",
        "model.ot.enabled": "transport",
        "model.moe.enabled": "_moe",
    }
    for key, fragment in checks.items():
        model = make_model(tokenizer, **{key: False})
        assert not any(fragment in n for n in names(model)), key
        assert sum(p.numel() for p in model.parameters()) < sum(
            p.numel() for p in full.parameters()
        )
    raw = make_model(
        tokenizer, **{"data.use_caption": False, "model.head.project_without_caption": False}
    )
    assert raw.head.entity is None and make_model(tokenizer).head.entity is not None
    # Captions are off with either switch, and the default (the original) then has no M.
    assert make_model(tokenizer, **{"caption.backend": "none"}).head.entity is None
    assert make_model(tokenizer, **{"data.use_caption": False}).head.entity is None
    projected = {"caption.backend": "none", "model.head.project_without_caption": True}
    assert make_model(tokenizer, **projected).head.entity is not None


@pytest.mark.parametrize("depth_embedding", ["tokens", "channel"])
def test_object_tokens_per_layer_follow_the_config(tokenizer, depth_embedding):
    overrides = {"model.pool_after_layer": 2, "model.depth_embedding": depth_embedding}
    model = make_model(tokenizer, **overrides).eval()
    batch = make_batch(tokenizer, [8, 9])
    with torch.no_grad():
        states = model.encode(batch)
    # 4 slots x (2x2 RGB + 2x2 depth patches, or 2x2 RGB-D patches) until pooled after layer 2,
    # then one token per slot.
    patches = SLOTS * (8 if depth_embedding == "tokens" else 4)
    assert [s.shape[1] for s in states.vision] == [patches] * 3 + [SLOTS, SLOTS]
    assert [s.shape[1] for s in states.text] == [batch["input_ids"].shape[1]] * 5


@pytest.mark.parametrize("depth_embedding", ["tokens", "channel"])
def test_model_config_rebuilds_the_same_model(tokenizer, depth_embedding):
    overrides = {"model.depth_embedding": depth_embedding}
    overrides |= {"data.use_box": False, "model.ot.barycentric": True}
    model = make_model(tokenizer, **overrides).eval()
    config = RemoteConfig.from_dict(json.loads(json.dumps(model.config.to_dict())))
    # JSON turns the BERT config's int label keys into strings; everything else round-trips.
    assert dataclasses.replace(config, text=model.config.text) == model.config
    torch.manual_seed(123)
    rebuilt = RemoteModel(config).eval()
    rebuilt.check_tokenizer(tokenizer)
    batch = make_batch(tokenizer, [8, 9, 10])
    with torch.no_grad():
        assert rel_err(rebuilt(batch), model(batch)) > 1e-3  # random weights differ
        rebuilt.load_state_dict(model.state_dict(), strict=True)
        assert torch.equal(rebuilt(batch), model(batch))
    with pytest.raises(ValueError, match="tokenizer has"):
        rebuilt.check_tokenizer(list(range(len(tokenizer) + 1)))  # a longer vocabulary


def test_wrong_number_of_object_slots_fails_clearly(tokenizer):
    model = make_model(tokenizer)
    batch = random_batch(tokenizer, [8], max_objects=SLOTS + 1)
    with pytest.raises(ValueError, match="object slots"):
        model(batch)


def test_tiny_model_overfits_a_small_batch(tokenizer):
    # 10 Sinkhorn iterations instead of 50 keep the test fast; the structure is the paper's.
    model = make_model(
        tokenizer, seed=1, **{"model.dropout": 0.0, "model.ot.iterations": 10}
    ).train()
    batch = make_batch(tokenizer, [6 + i % 5 for i in range(32)], caption_length=2, seed=3)
    batch["labels"] = torch.arange(32) % 28  # arbitrary but fixed: learnable only by fitting
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = 0
    while steps < 60:  # the bound: 100% train accuracy takes about 20 steps here
        logits = model(batch)
        if (logits.argmax(-1) == batch["labels"]).all():
            break
        optimizer.zero_grad()
        F.cross_entropy(logits, batch["labels"]).backward()
        optimizer.step()
        steps += 1
    model.eval()
    with torch.no_grad():
        accuracy = (model(batch).argmax(-1) == batch["labels"]).float().mean().item()
    assert accuracy == 1.0, f"train accuracy {accuracy} after {steps} steps"


@pytest.mark.parametrize(
    ("ot_mode", "solver", "kept"),
    [("transport", "fused", 0.1), ("transport", "log_sinkhorn", 0.1), ("uniform", "fused", 0.3)],
)
def test_gradient_checkpointing_gives_the_unchecked_gradients(tokenizer, ot_mode, solver, kept):
    """train.gradient_checkpointing recomputes each layer (its pair and its OT step) in the
    backward pass (dropout replayed from the saved RNG state): the same loss, the same gradient
    tensor for tensor, and the OT regime monitor counts each batch once."""
    overrides = {"model.dropout": 0.1, "model.ot.mode": ot_mode, "model.ot.solver": solver}
    if solver == "log_sinkhorn":
        overrides["model.ot.kernel_floor"] = 0.0
    model = make_model(tokenizer, **overrides).train()
    batch = make_batch(tokenizer, [8, 9, 12])
    grads, losses, regimes, totals = [], [], [], []
    for checkpointed in (False, True):
        model.encoder.gradient_checkpointing = checkpointed
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same dropout masks in both runs
        with record_regime(model) as regime:
            loss = F.cross_entropy(model(batch), batch["labels"])
            loss.backward()
        regimes.append(regime_summary(regime))
        # The summary's shares, minimum, median and ratio are the same over a batch seen twice: the
        # sums themselves show whether the recomputation in the backward pass added to them.
        stats = [s for stream in regime.values() for s in stream]
        totals.append([float(v) for s in stats for v in (s.entries, s.hidden_sq, s.update_sq)])
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert regimes[0] == regimes[1] and regimes[0]
    assert totals[1] == pytest.approx(totals[0], rel=1e-6)
    # It does checkpoint: of the encoder's activations, only the layers' inputs are kept for the
    # backward pass, OT included (the uniform mode's running sums stay outside the layers).
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inside: list[bool] = []  # non-empty during the encoder's forward
    hooks = [
        model.encoder.register_forward_pre_hook(lambda *_: inside.append(True)),
        model.encoder.register_forward_hook(lambda *_: inside.clear()),
    ]
    saved = []
    for checkpointed in (False, True):
        model.encoder.gradient_checkpointing = checkpointed
        sizes: dict[int, int] = {}  # storages the encoder's forward keeps, weights left out

        def pack(t: torch.Tensor, sizes: dict[int, int] = sizes) -> torch.Tensor:
            storage = t.untyped_storage()
            if inside and storage.data_ptr() not in weights:
                sizes[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(batch)
        saved.append(sum(sizes.values()))
    for hook in hooks:
        hook.remove()
    print(f"saved activations with / without checkpointing: {saved[1] / saved[0]:.3f}")
    assert saved[1] < kept * saved[0]


def test_a_written_model_folder_loads_back_to_the_same_logits_and_facts(tokenizer, tmp_path):
    from pipeline.config import params_to_dict
    from pipeline.model.saved import load_trained, write_trained

    overrides = {"data.max_objects": SLOTS, "model.ot.mode": "uniform"}
    overrides |= {"model.depth_embedding": "channel", "data.use_box": False}
    params = default_params(overrides)
    torch.manual_seed(0)
    model = build_model(params, 3, tokenizer).eval()
    labels = ["none", "zeta", "alpha"]  # ids follow the list, not the alphabet
    info = {"epoch": 2, "dev": {"micro_f1": 0.5}}
    folder = tmp_path / "model"
    write_trained(folder, model, params, labels, tokenizer, info, "the card\n")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "tokenizer", "trained.json"
    ]  # fmt: skip
    assert (folder / "README.md").read_text() == "the card\n"
    assert json.loads((folder / "trained.json").read_text()) == {
        "format": 2,
        "params": params_to_dict(params),
        "tokenizer": {"name": "tiny", "path": "tokenizer"},
        "labels": {"none": 0, "zeta": 1, "alpha": 2},
        "info": {"epoch": 2, "dev": {"micro_f1": 0.5}},
    }
    loaded = load_trained(folder)
    assert not loaded.model.training
    assert (loaded.params, loaded.labels, loaded.info) == (params, labels, info)
    assert loaded.model.config == model.config
    assert len(loaded.tokenizer) == len(tokenizer)
    batch = make_batch(tokenizer, [8, 11, 6])
    with torch.no_grad():
        assert torch.equal(loaded.model(batch), model(batch))
    # A folder of another format, older or newer, is refused.
    meta = json.loads((folder / "trained.json").read_text())
    for version in (1, 3):
        (folder / "trained.json").write_text(json.dumps({**meta, "format": version}))
        with pytest.raises(ValueError, match=f"format {version}, expected 2"):
            load_trained(folder)


def test_a_model_folder_whose_tokenizer_does_not_fit_its_model_is_refused(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.model.saved import load_trained, write_trained

    params = default_params({"data.max_objects": SLOTS})
    model = build_model(params, 3, tokenizer)
    folder = tmp_path / "model"
    write_trained(folder, model, params, ["none", "a", "b"], tokenizer, {}, "")
    longer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    longer.add_tokens(["<extra>"])
    longer.save_pretrained(str(folder / "tokenizer"))
    with pytest.raises(ValueError, match="tokenizer has"):
        load_trained(folder)


def test_a_format_2_config_reads_as_a_transport_model_and_other_formats_are_refused(tokenizer):
    model = make_model(
        tokenizer, **{"model.ot.mode": "uniform", "model.depth_embedding": "channel"}
    )
    current = json.loads(json.dumps(model.config.to_dict()))
    assert current["format"] == 3
    assert RemoteConfig.from_dict(current).ot.mode == "uniform"
    # Format 2 came before model.ot.mode: every model of that format transported.
    old = {**current, "format": 2, "ot": {k: v for k, v in current["ot"].items() if k != "mode"}}
    config = RemoteConfig.from_dict(old)
    assert config.ot == dataclasses.replace(model.config.ot, mode="transport")
    # A key added later (pipeline.config.ADDED_PARAMS) reads as the value that reproduces it.
    assert current["depth_embedding"] == "channel"
    del old["depth_embedding"]
    assert RemoteConfig.from_dict(old).depth_embedding == "tokens"
    for version in (1, 4, None):
        with pytest.raises(ValueError, match=f"model config format {version!r} is not supported"):
            RemoteConfig.from_dict({**current, "format": version})


def test_the_model_config_takes_each_field_from_its_param():
    overrides = {"features.crop_size": 32, "data.max_objects": 5, "data.use_depth": False}
    overrides |= {"model.depth_embedding": "channel", "data.use_box": False, "model.init": "normal"}
    overrides |= {"model.pool_after_layer": 2, "model.fusion_start_layer": 3}
    overrides |= {"model.dropout": 0.25, "data.pad_to_max": True, "model.ot.epsilon": 0.75}
    params = default_params(overrides)
    config = RemoteConfig.from_params(params, 7, {"bert_config": {}}, {"architecture": "vit"})
    sections = ("ot", "moe", "head")
    assert {k: v for k, v in dataclasses.asdict(config).items() if k not in sections} == {
        "text": {"bert_config": {}}, "vision": {"architecture": "vit"}, "num_labels": 7,
        "crop_size": 32, "max_objects": 5, "use_depth": False, "depth_embedding": "channel",
        "use_box": False, "use_caption": True, "mask_padding": False, "init": "normal",
        "pool_after_layer": 2, "fusion_start_layer": 3, "dropout": 0.25,
    }  # fmt: skip
    assert (config.ot, config.moe, config.head) == (
        params.model.ot, params.model.moe, params.model.head
    )  # fmt: skip
    # Captions reach the model only with both switches on; padding is masked without pad_to_max.
    for change, use_caption in (({"caption.backend": "none"}, False), ({}, True)):
        changed = default_params({**change, "data.pad_to_max": False})
        config = RemoteConfig.from_params(changed, 7, {}, {})
        assert (config.use_caption, config.mask_padding) == (use_caption, True)


def test_random_batch_follows_the_batch_contract(tokenizer):
    # The helper every model test draws its batches from: markers where marker_pos says, one
    # word inside each <s> .. </s>, captions in segment 1, two distinct objects for an
    # object-object pair, zero crops and boxes in empty slots, boxes with their area.
    lengths = [4, 9, 12, 5, 7, 6]
    batch = random_batch(tokenizer, lengths, max_objects=SLOTS, caption_length=3, pad_to=40, seed=5)
    assert batch["input_ids"].shape == (6, 40)
    assert batch["pair_kind"].tolist() == [0, 1, 2, 0, 1, 2]
    for b in range(6):
        real = int(batch["attention_mask"][b].sum())
        assert batch["attention_mask"][b].tolist() == [1] * real + [0] * (40 - real)
        assert (batch["input_ids"][b, real:] == tokenizer.pad_token_id).all()
        tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][b, :real].tolist())
        sep = tokens.index("[SEP]")
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
        assert sep == 1 + lengths[b] + 2 * (2 - int(batch["pair_kind"][b]))  # words + <s>, </s>
        segments = [0] * (sep + 1) + [1] * (real - sep - 1) + [0] * (40 - real)
        assert batch["token_type_ids"][b].tolist() == segments
        kind = b % 3
        slots = batch["object_slot"][b].tolist()
        count = int(batch["num_objects"][b])
        for entity, is_object in enumerate((kind == 2, kind >= 1)):
            n = entity + 1
            s, k, o = batch["marker_pos"][b, entity].tolist()
            if is_object:
                assert s == k == -1 and 0 <= slots[entity] < count
                assert tokens[o] == f"<o{n}>" and tokens[o + 4] == f"</o{n}>" and o > sep
            else:
                assert o == -1 and slots[entity] == -1
                assert tokens[s] == f"<s{n}>" and tokens[s + 2] == f"</s{n}>" and s < sep
                assert tokens[k] == f"<k{n}>" and tokens[k + 4] == f"</k{n}>" and k > sep
        if kind == 2:
            assert slots[0] != slots[1]
        filled = torch.arange(SLOTS) < count
        for key in ("pixel_values", "depth_values", "boxes"):
            value = batch[key][b]
            assert not value[~filled].any(), key
            assert value[filled].flatten(1).abs().amax(dim=1).gt(0).all(), key
        x1, y1, x2, y2, area = batch["boxes"][b, filled].unbind(-1)
        assert (x1 >= 0).all() and (x1 < x2).all() and (x2 <= 1).all()
        assert (y1 >= 0).all() and (y1 < y2).all() and (y2 <= 1).all()
        torch.testing.assert_close(area, (x2 - x1) * (y2 - y1))


def test_a_model_folder_must_hold_exactly_the_models_tensors(tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model(tokenizer).eval()
    model.save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    state = load_file(str(weights))
    batch = make_batch(tokenizer, [8, 9])
    with torch.no_grad():
        assert torch.equal(RemoteModel.from_pretrained(tmp_path / "model")(batch), model(batch))
    save_file({k: v for k, v in state.items() if k != "head.classifier.bias"}, str(weights))
    with pytest.raises(RuntimeError, match="Missing key.*head.classifier.bias"):
        RemoteModel.from_pretrained(tmp_path / "model")
    save_file({**state, "head.extra": torch.zeros(2)}, str(weights))
    with pytest.raises(RuntimeError, match="Unexpected key.*head.extra"):
        RemoteModel.from_pretrained(tmp_path / "model")


def test_max_seq_beyond_the_text_towers_positions_is_refused(tokenizer):
    positions = make_model(tokenizer).config.text["bert_config"]["max_position_embeddings"]
    assert make_model(tokenizer, **{"data.max_seq": positions}).encoder is not None
    with pytest.raises(
        ValueError, match=f"max_seq {positions + 1} exceeds .* {positions} position"
    ):
        make_model(tokenizer, **{"data.max_seq": positions + 1})
