"""Evaluation by generation: what the policy and the reference *write* for the same prompts, scored.

``generate`` runs the models in Ray Data actors; ``scoring`` holds the verifiers and the win rate;
``stage.run_evaluate`` is ``rayalign evaluate``.
"""
