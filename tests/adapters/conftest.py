"""Fixtures for the adapter tests (the session model fixtures come from tests/conftest.py)."""

from __future__ import annotations

import copy

import pytest


@pytest.fixture(scope="module")
def work_model(hf_model):
    """A private deep copy of the fp32 transformers model, for merging adapters into (restored
    after each use by ``adapter_helpers.merged``)."""
    return copy.deepcopy(hf_model)
