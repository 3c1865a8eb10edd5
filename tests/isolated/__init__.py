"""Tests on Ray nodes that share no filesystem, with a real S3 server (make test-no-shared-fs).

A package, so that its conftest.py is imported as ``isolated.conftest`` and never takes the name
``conftest`` from tests/conftest.py."""
