"""REMOTE: embeddings -> dual-stream encoder (+ multilevel OT) -> layer-wise MoE ->
entity head -> relation logits.

``build_model(params, num_labels, tokenizer)`` builds it from params (pretrained towers when asked);
``RemoteModel.config`` (a :class:`~pipeline.model.config.RemoteConfig`) rebuilds the same
architecture with random weights. The model is a Hugging Face Hub object
(:class:`huggingface_hub.PyTorchModelHubMixin`): ``save_pretrained(folder)`` writes
``config.json`` (the config's JSON form) and ``model.safetensors``; ``RemoteModel.from_pretrained``
reads them back from a folder or a Hub repository, and ``push_to_hub`` uploads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin, snapshot_download
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import Params
from pipeline.hub import no_folder_error
from pipeline.model.config import RemoteConfig
from pipeline.model.embeddings import ObjectPatchEmbeddings, ObjectPooling
from pipeline.model.encoder import DualStreamEncoder, EncoderStates
from pipeline.model.moe import LayerwiseMoE
from pipeline.model.towers import (
    load_text_tower,
    load_vision_tower,
    text_tower_from_spec,
    vision_tower_from_spec,
)

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "EntityHead", "RemoteModel", "build_model"]


class EntityHead(nn.Module):
    """Entity vectors and relation logits.

    A text entity is ``M([h_<s>, h_<k>])``, an object ``M([v_obj, h_<o>])`` with ``M = Linear(2D, D)``;
    an absent marker contributes zeros. Without ``M`` (captions off and
    ``head.project_without_caption`` false, as in the original) the entity is ``h_<s>`` / ``v_obj``.
    Logits are ``Linear(2D, num_labels)([head, tail])``, with no dropout before it (as the original).
    """

    def __init__(self, hidden: int, num_labels: int, project: bool) -> None:
        super().__init__()
        self.entity = nn.Linear(2 * hidden, hidden) if project else None
        self.classifier = nn.Linear(2 * hidden, num_labels)

    def entity_vectors(
        self, markers: torch.Tensor, objects: torch.Tensor, is_object: torch.Tensor
    ) -> torch.Tensor:
        """``markers`` ``[B, 2, 3, D]`` (head/tail x <s>/<k>/<o> states, zeros where absent),
        ``objects`` ``[B, 2, D]``, ``is_object`` ``[B, 2]`` bool -> ``[B, 2, D]``."""
        is_object = is_object[..., None]
        first = torch.where(is_object, objects, markers[:, :, 0])
        if self.entity is None:
            return first
        second = torch.where(is_object, markers[:, :, 2], markers[:, :, 1])
        return self.entity(torch.cat([first, second], dim=-1))

    def forward(
        self, markers: torch.Tensor, objects: torch.Tensor, is_object: torch.Tensor
    ) -> torch.Tensor:
        pair = self.entity_vectors(markers, objects, is_object).flatten(1)  # [head, tail]
        return self.classifier(pair)


def _gather(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``states[b, index[b, k]]`` for ``index`` ``[B, K]`` (negative -> position 0) -> ``[B, K, D]``."""
    index = index.clamp(min=0)[..., None].expand(-1, -1, states.shape[-1])
    return torch.gather(states, 1, index)


CONFIG_FILE = "config.json"  # the Hub mixin's name for it
WEIGHTS_FILE = "model.safetensors"


class RemoteModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="remote-pipeline",
    tags=["relation-extraction", "multimodal", "optimal-transport"],
    pipeline_tag="text-classification",
    license="mit",
):
    """The REMOTE relation classifier; ``forward(batch) -> logits [B, num_labels]``.

    The batch follows docs/ARCHITECTURE.md. Object slots beyond ``num_objects`` hold zero crops and
    are not masked (as in the original): they take part in attention, pooling and OT like any slot.
    """

    def __init__(
        self,
        config: RemoteConfig,
        text_tower: nn.Module | None = None,
        vision_tower: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        if text_tower is None:
            text_tower = text_tower_from_spec(config.text)
        if vision_tower is None:
            vision_tower = vision_tower_from_spec(config.vision)
        text_config = text_tower.config
        hidden = text_config.hidden_size
        if vision_tower.embed_dim != hidden:
            raise ValueError(
                f"the text tower's hidden size is {hidden} but the vision tower's is "
                f"{vision_tower.embed_dim}; REMOTE needs equal sizes (pick towers that match)"
            )
        self.max_objects = config.max_objects
        self.mask_padding = config.mask_padding
        self.use_box = config.use_box
        self.text_embeddings = text_tower.embeddings
        self.object_embeddings = ObjectPatchEmbeddings(
            vision_tower, config.crop_size, config.use_depth, config.depth_embedding
        )
        pooling = ObjectPooling(
            hidden, self.object_embeddings.tokens_per_object, config.use_box, config.dropout
        )
        self.encoder = DualStreamEncoder(
            list(text_tower.encoder.layer),
            list(vision_tower.blocks),
            pooling,
            pool_after_layer=config.pool_after_layer,
            fusion_start_layer=config.fusion_start_layer,
            ot=config.ot if config.ot.enabled else None,
        )
        num_states = text_config.num_hidden_layers + 1
        self.text_moe = self.object_moe = None
        if config.moe.enabled:
            heads = text_config.num_attention_heads
            # Each direction takes its activation and attention dropout from one tower, as the
            # original: vision -> text from the text tower, text -> vision from the vision tower.
            block = vision_tower.blocks[0]
            self.text_moe = LayerwiseMoE(
                hidden,
                heads,
                num_states,
                text_tower.encoder.layer[0].intermediate.intermediate_act_fn,
                text_config.attention_probs_dropout_prob,
            )
            self.object_moe = LayerwiseMoE(
                hidden, heads, num_states, block.mlp.act, block.attn.attn_drop.p
            )
        project = config.use_caption or config.head.project_without_caption
        self.head = EntityHead(hidden, config.num_labels, project)
        if config.init == "normal":
            self._init_normal(text_config.initializer_range)
        elif config.init != "original":
            raise ValueError(f"model.init {config.init!r}: expected 'original' or 'normal'")

    def added_modules(self) -> list[nn.Module]:
        """The modules REMOTE adds to the two towers (what ``model.init`` initializes)."""
        added = [self.encoder.pooling, self.head, self.text_moe, self.object_moe]
        added += [layer.fusion for layer in self.encoder.text_layers]
        added += [self.encoder.text_transport, self.encoder.vision_transport]
        return [module for module in added if module is not None]

    def _init_normal(self, std: float) -> None:
        """``model.init: normal``: BERT-style ``N(0, std)`` weights and zero biases for the added
        modules, experts included. ``original`` keeps what construction gave them: PyTorch's
        default ``nn.Linear`` / ``nn.LayerNorm`` init and Xavier-uniform experts."""
        for module in self.added_modules():
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=std)
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)
                elif isinstance(sub, nn.LayerNorm):
                    nn.init.ones_(sub.weight)
                    nn.init.zeros_(sub.bias)
                elif isinstance(sub, LayerwiseMoE):
                    nn.init.normal_(sub.up, std=std)
                    nn.init.normal_(sub.down, std=std)

    def _save_pretrained(self, save_directory: Path) -> None:
        """``config.json`` (with its format version) and ``model.safetensors`` (no pickles)."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(save_directory / WEIGHTS_FILE), metadata={"format": "pt"})
        text = json.dumps(self.config.to_dict(), indent=2, sort_keys=True)
        (save_directory / CONFIG_FILE).write_text(text + "\n")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, **kwargs: Any
    ) -> RemoteModel:
        """A model folder or a Hub id, as the Hub mixin loads it; a name that is neither says so
        (the mixin's own error asks to check the connection, also for a mistyped folder)."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (OSError, ValueError) as exc:
            if Path(pretrained_model_name_or_path).is_dir():
                raise
            raise no_folder_error(pretrained_model_name_or_path, exc) from exc

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        map_location: str | torch.device = "cpu",
        **_: Any,
    ) -> RemoteModel:
        """The architecture of ``config.json`` with random weights, then the saved weights
        (strict: every tensor must match); in eval mode. The mixin's own decoding of the config
        is replaced by :meth:`RemoteConfig.from_dict`, which checks its format version."""
        folder = Path(model_id)
        if not folder.is_dir():
            folder = Path(
                snapshot_download(
                    model_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    local_files_only=local_files_only,
                    token=token,
                )
            )
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder}: not a REMOTE model folder (no {CONFIG_FILE})")
        model = cls(RemoteConfig.from_dict(json.loads(config_path.read_text())))
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
        return model.to(map_location).eval()

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer whose vocabulary is not the one the model was built for."""
        vocab_size = self.config.text["bert_config"]["vocab_size"]
        if len(tokenizer) != vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the model config has {vocab_size}"
            )

    def encode(self, batch: dict[str, torch.Tensor]) -> EncoderStates:
        """Embeddings and the dual-stream encoder: every recorded state of both streams."""
        if batch["pixel_values"].shape[1] != self.max_objects:
            raise ValueError(
                f"batch has {batch['pixel_values'].shape[1]} object slots, the model "
                f"{self.max_objects} (data.max_objects)"
            )
        text = self.text_embeddings(
            input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids")
        )
        depth = batch["depth_values"] if self.object_embeddings.depth_patch is not None else None
        vision = self.object_embeddings(batch["pixel_values"].to(text.dtype), depth)
        boxes = batch["boxes"] if self.use_box else None
        text_mask = batch["attention_mask"].bool()
        padded = batch.get("text_padded")
        return self.encoder(text, vision, boxes, text_mask, self.mask_padding, padded)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Relation logits ``[B, num_labels]`` for a batch as in docs/ARCHITECTURE.md."""
        states = self.encode(batch)
        batch_size = batch["input_ids"].shape[0]
        positions = batch["marker_pos"].reshape(batch_size, 6)
        slots = batch["object_slot"]
        # Only the tokens the head reads go through the MoE (it acts per token).
        markers = _gather(states.text[-1], positions)
        objects = _gather(states.vision[-1], slots)
        if self.text_moe is not None:
            text_mask = batch["attention_mask"].bool() if self.mask_padding else None
            markers = self.text_moe(markers, states.vision)
            objects = self.object_moe(objects, states.text, text_mask)
        markers = markers * (positions >= 0)[..., None].to(markers.dtype)
        is_object = slots >= 0
        objects = objects * is_object[..., None].to(objects.dtype)
        return self.head(markers.reshape(batch_size, 2, 3, -1), objects, is_object)


def build_model(params: Params, num_labels: int, tokenizer: Any) -> RemoteModel:
    """REMOTE from params: towers by name (pretrained weights when ``model.pretrained`` and the name
    has them; ``tiny`` presets otherwise), everything else from ``params.model``. Seed beforehand."""
    model_params = params.model
    text_tower, text_spec = load_text_tower(
        model_params.text_model, model_params.pretrained, len(tokenizer)
    )
    max_positions = text_tower.config.max_position_embeddings
    if params.data.max_seq > max_positions:
        raise ValueError(
            f"data.max_seq {params.data.max_seq} exceeds the text tower's "
            f"{max_positions} position embeddings"
        )
    vision_tower, vision_spec = load_vision_tower(
        model_params.vision_model, model_params.pretrained
    )
    config = RemoteConfig.from_params(params, num_labels, text_spec, vision_spec)
    return RemoteModel(config, text_tower, vision_tower)
