"""The REMOTE model, its modules in the order data flows through them:
``towers`` (BERT + ViT by name), ``embeddings``, ``encoder`` (dual stream), ``ot``, ``moe``,
``remote`` (entity head, model, ``build_model``); ``config`` (``RemoteConfig``) fixes the
architecture, ``saved`` reads a trained model folder; ``example`` makes random batches for tests and
benchmarks."""
