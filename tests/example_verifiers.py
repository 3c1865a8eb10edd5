"""Verifiers a user might write (``eval.generation.verifier: example_verifiers:<name>``), for tests/test_evaluate.py."""

from __future__ import annotations


def answer_field(prompt: str, response: str, record: dict) -> float:
    """1.0 when the response starts with the record's ``answer``; raises KeyError on a record without one."""
    return float(response.strip().startswith(str(record["answer"])))
