"""Shared test settings: tests never download (Keras' ImageNet files included)."""

import pytest


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """``KPNET_OFFLINE=1``: a missing keras.applications file fails fast instead of downloading
    (tests of the download path unset it and block the network themselves)."""
    monkeypatch.setenv("KPNET_OFFLINE", "1")
