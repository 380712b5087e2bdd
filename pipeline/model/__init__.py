"""The REMOTE model (DESIGN.md §3), its modules in the order data flows through them:
``towers`` (BERT + ViT by name), ``embeddings``, ``encoder`` (dual stream), ``ot``, ``moe``,
``remote`` (entity head, model, ``build_model``); ``example`` makes random batches for tests and
benchmarks."""

from pipeline.model.remote import EntityHead, RemoteModel, build_model
from pipeline.model.towers import load_text_tower, load_vision_tower, save_vision_tower

__all__ = [
    "EntityHead",
    "RemoteModel",
    "build_model",
    "load_text_tower",
    "load_vision_tower",
    "save_vision_tower",
]
