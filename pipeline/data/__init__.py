"""Stage 1, ``download``: any source to the normalized dataset layout (reader: ``records``)."""
