"""Stage 3, ``caption``: a caption for every text entity and object (reader: ``table``)."""
