"""Stage 4, ``features``: text and image features of every split as Parquet (reader: ``dataset``)."""
