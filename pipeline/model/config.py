"""``RemoteConfig``: everything that fixes REMOTE's architecture, as one typed object.

Its JSON form (:meth:`RemoteConfig.to_dict`) is what a trained model folder stores: the towers'
rebuild specs (see :mod:`pipeline.model.towers`) and what params decide, so the model can be rebuilt
with random weights and its saved state dict loaded into it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.config import (
    ADDED_PARAMS_HINT,
    HeadParams,
    MoEParams,
    OTParams,
    Params,
    with_added_params,
)

__all__ = ["CONFIG_FORMAT", "RemoteConfig"]

CONFIG_FORMAT = 3  # 2: experts as 3-D tensors, fusion bias, model.init, ot.clamp; 3: ot.mode


@dataclass(frozen=True)
class RemoteConfig:
    text: dict[str, Any]  # {"bert_config": BertConfig.to_dict()}
    vision: dict[str, Any]  # {"architecture": timm name, "model_args": {...}}
    num_labels: int
    crop_size: int
    max_objects: int
    use_depth: bool
    depth_embedding: str  # model.depth_embedding: "tokens" | "channel"
    use_box: bool
    use_caption: bool
    mask_padding: bool  # not data.pad_to_max: padding is masked out of OT, fusion and prefixes
    init: str  # model.init: "original" | "normal"
    pool_after_layer: int
    fusion_start_layer: int
    dropout: float
    ot: OTParams
    moe: MoEParams
    head: HeadParams

    @classmethod
    def from_params(
        cls, params: Params, num_labels: int, text: dict[str, Any], vision: dict[str, Any]
    ) -> RemoteConfig:
        """The config of a model built from ``params`` with towers of these specs."""
        return cls(
            text=text,
            vision=vision,
            num_labels=num_labels,
            crop_size=params.features.crop_size,
            max_objects=params.data.max_objects,
            use_depth=params.data.use_depth,
            depth_embedding=params.model.depth_embedding,
            use_box=params.data.use_box,
            use_caption=params.use_captions,
            mask_padding=not params.data.pad_to_max,
            init=params.model.init,
            pool_after_layer=params.model.pool_after_layer,
            fusion_start_layer=params.model.fusion_start_layer,
            dropout=params.model.dropout,
            ot=params.model.ot,
            moe=params.model.moe,
            head=params.model.head,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with its format version."""
        return {"format": CONFIG_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RemoteConfig:
        """Read the JSON form back; an unknown format version is refused."""
        if raw.get("format") not in (2, CONFIG_FORMAT):
            raise ValueError(
                f"model config format {raw.get('format')!r} is not supported "
                f"(expected {CONFIG_FORMAT})"
            )
        fields = {k: v for k, v in raw.items() if k != "format"}
        if raw["format"] == 2:  # before ot.mode: every model transported
            fields["ot"] = {**fields["ot"], "mode": "transport"}
        sections = {"ot": OTParams, "moe": MoEParams, "head": HeadParams}
        # model params added since the folder was saved, at the values that reproduce it
        fields = with_added_params(fields, prefix="model.")
        try:
            return cls(**{k: sections[k](**v) if k in sections else v for k, v in fields.items()})
        except TypeError as exc:  # a field missing (or unknown): name it, as params loading does
            raise ValueError(f"model config: {exc} ({ADDED_PARAMS_HINT})") from exc
