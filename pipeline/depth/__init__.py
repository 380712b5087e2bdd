"""Stage 2, ``depth``: a depth map for every image into a sharded store (reader: ``store``)."""
