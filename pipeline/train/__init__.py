"""Stage 5, ``train``: the training loop and what it writes (``checkpoint``)."""
