"""Reference stage: the frozen reference's log-probs of every pair (δ_ref), scored once.

``actors`` (transformers or vLLM scorers in a Ray Data actor pool), ``cache`` (scored pairs kept as
Parquet, keyed by everything they depend on), ``check`` (vLLM against the training forward pass),
``stage`` (what training receives: :class:`~rayalign.reference.stage.ScoredPairs`).
"""
