"""Data stage: preference files (or the synthetic task) → validated, tokenized pairs, with a quarantine.

``records`` parses and tokenizes each record (Ray Data); ``synthetic`` generates the default task;
``stage.prepare_data`` is the opening every workflow shares.
"""
