"""Stage 6, ``evaluate``: test metrics, tables and plot data (``report``) and pictures (``plots``)."""
