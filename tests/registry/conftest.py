"""Fixtures of the registry tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def every_refusal_logged(monkeypatch):
    """Each refusal's log line is checked here: none held back by RefusalLog's 10 s per tenant."""
    from nlora_serve import errors

    monkeypatch.setattr(errors, "REFUSAL_LOG_SECONDS", 0.0)
