"""Sweep stage: Ray Tune searches the constraint strength (γ, α, τ) or any other config key.

``sweep`` runs the search (reference scored once, shared by all trials); ``results`` turns Tune's
record into the results table, the best config and the plot.
"""
