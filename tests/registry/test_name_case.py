"""Adapter names that differ only in case (issue 16): on a case-insensitive file system they are
one folder, so registration refuses a name that case-folds to a stored adapter's or to the
served base model's name."""

from __future__ import annotations

import os
import shutil

import pytest

from nlora_serve.adapters.store import CONFIG_FILE, STAGING, WEIGHTS_FILE, AdapterStore
from nlora_serve.errors import AdapterError
from nlora_serve.serving.server_config import ServerConfig

FILES = {CONFIG_FILE: b'{"r": 4}', WEIGHTS_FILE: b"\x00" * 64}


@pytest.mark.parametrize("first,second", [("Acme", "acme"), ("acme", "ACME"), ("tenant-A.v1", "Tenant-a.V1")])
def test_a_name_differing_only_in_case_is_refused_and_nothing_is_written(tmp_path, first, second):
    store = AdapterStore(tmp_path)
    kept = store.write(first, FILES)
    with pytest.raises(AdapterError) as err:
        store.write(second, {**FILES, WEIGHTS_FILE: b"\x01" * 64})
    assert repr(first) in str(err.value) and repr(second) in str(err.value) and "case" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == sorted([first, STAGING]) and os.listdir(tmp_path / STAGING) == []
    assert store.names() == [first] and store.latest(first).content_hash == kept.content_hash
    assert store.write(first, FILES).version == 2  # the stored name itself still takes new versions


def test_an_unloaded_name_still_holds_its_case_folded_name(tmp_path):
    store = AdapterStore(tmp_path)
    store.write("Acme", FILES)
    store.mark_unloaded("Acme")
    with pytest.raises(AdapterError, match="case"):
        store.write("acme", FILES)


@pytest.mark.parametrize("name", ["smollm2-135m", "SMOLLM2-135M", "SmolLM2-135M"])
def test_the_served_model_name_in_any_case_is_refused(name):
    config = ServerConfig(port=0, served_model_name="SmolLM2-135M")
    with pytest.raises(AdapterError, match="served base model name"):
        config.check_adapter_name(name)
    config.check_adapter_name("SmolLM2-135M-tenant")  # a different name passes


def _twin(tmp_path, kept: str, twin: str) -> None:
    """Make ``twin`` a copy of the stored ``kept`` (what an operator's cp -r does: upload refuses it)."""
    shutil.copytree(tmp_path / kept, tmp_path / twin)


@pytest.mark.parametrize("names", [("Lower", "lower"), ("lower", "Lower")])
def test_restore_serves_only_the_first_of_case_twins_and_logs_both(tmp_path, caplog, names):
    store = AdapterStore(tmp_path)
    store.write(names[0], FILES)
    _twin(tmp_path, names[0], names[1])
    with caplog.at_level("ERROR", logger="nlora_serve.adapters.store"):
        assert store.names(warn=False) == ["Lower"]  # "L" (0x4c) sorts before "l" (0x6c)
        assert not caplog.records
        assert AdapterStore(tmp_path).names() == ["Lower"]
    assert len(caplog.records) == 1 and caplog.records[0].levelname == "ERROR"
    message = caplog.records[0].getMessage()
    assert "'lower'" in message and "'Lower'" in message and "case" in message


def test_an_unloaded_first_twin_still_holds_the_name_at_restore(tmp_path):
    store = AdapterStore(tmp_path)
    store.write("Acme", FILES)
    _twin(tmp_path, "Acme", "acme")
    store.write("zeta", FILES)
    store.mark_unloaded("Acme")
    assert AdapterStore(tmp_path).names() == ["zeta"]  # neither twin: upload would refuse "acme" too
