"""The REMOTE pipeline library: no CLI, no global state; one package per stage, in pipeline order.

``data`` -> ``depth`` / ``caption`` -> ``features`` -> ``train`` (with ``model``) -> ``evaluate``;
``predict`` labels new inputs with a trained model. Each stage's output has one small reader
(``data.records``, ``depth.store``, ``caption.table``, ``features.dataset``, ``model.saved``), and a
later stage reads an earlier one's output only through it. Below them: ``config`` (typed params),
``io`` (errors, atomic writes, folder swaps, hashing), ``hub`` (model names), ``device``, ``text``
(markers and tokenizer), ``metrics`` (pure). ``inference`` (running a model over features) sits
above ``features`` and ``model``, below ``train``.
``docs/ARCHITECTURE.md`` has the map; import-linter contracts in ``pyproject.toml`` hold it.
"""
