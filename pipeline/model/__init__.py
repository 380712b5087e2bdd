"""The REMOTE model, its modules in the order data flows through them:
``towers`` (BERT + ViT by name), ``embeddings``, ``encoder`` (dual stream), ``ot``, ``moe``,
``remote`` (entity head, model, ``build_model``); ``regime`` monitors where the OT sits against its
kernel floor; ``config`` (``RemoteConfig``) fixes the architecture, ``saved`` writes and reads a
trained model folder and ``card`` its model card; ``example`` makes random batches for tests and
benchmarks."""
