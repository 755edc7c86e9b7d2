"""SIGKILL a serve process at seeded random points of uploads, swaps, unloads and loads, reopen
its store, and check (issue 16): every name serves exactly its last acknowledged state (the
content hash of its last acknowledged version, or unloaded) or the whole result of the one
operation in flight, no version folder is half-written, nothing but versions, UNLOADED
markers and the store's base-model record lies outside the staging area, and the staging area is empty after the restart.

The kill comes from a store fault hook (tests/grpc/crash_serve.py) just before a chosen file
operation (write, fsync, rename, ...). SIGKILL keeps the page cache, so this tests the order of
renames and markers, not fsync; tests/registry/test_store_durability.py tests fsync.

CI runs NLORA_CRASH_TRIALS=4 trials by default (about 15 s each: a server start); the full run
is ``NLORA_CRASH_TRIALS=100 pytest -s tests/grpc/test_grpc_crash.py`` (prints the outcome table).
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch

from nlora_serve.adapters.loader import read_adapter
from nlora_serve.adapters.runtime.manager import AdapterManager
from nlora_serve.adapters.store import ALLOWED_FILES, STAGING, UNLOADED
from nlora_serve.adapters.store.base_record import BASE_FILE
from nlora_serve.adapters.store.sums import SUMS_FILE
from nlora_serve.client import NloraClient
from serving_check import CASES, TIED

ROOT = Path(__file__).parents[2]
TRIALS = int(os.environ.get("NLORA_CRASH_TRIALS", "4"))
NAMES = ("tenant-a", "tenant-b")
FACTORS = (0.5, 0.25, 2.0, 0.75)  # swap payloads: the case's N scaled
OPS_PER_TRIAL = 6
LAUNCH = "import sys; sys.path.insert(0, 'tests/grpc'); import crash_serve; crash_serve.main()"


@pytest.fixture(scope="module")
def payloads(base_fp32, tmp_path_factory):
    """The swap payloads and every hash a name can reach: (payload by factor, hash by state key)."""
    original = CASES / TIED / "adapter_model.safetensors"
    tensors = safetensors.torch.load(original.read_bytes())
    n_only = {k: v for k, v in tensors.items() if "lora_N" in k}
    swaps = {f: safetensors.torch.save({k: v * f for k, v in n_only.items()}) for f in FACTORS}
    scratch = AdapterManager(base_fp32, tmp_path_factory.mktemp("hashes"))  # in this process, no hook
    hashes = {"upload": scratch.register_dir(TIED, CASES / TIED).content_hash}
    for f, payload in swaps.items():
        hashes[f"swap{f}"] = scratch.swap(TIED, payload).content_hash
    return swaps, hashes


def _start(store: Path, kill_at: int, note: Path) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "NLORA_TEST_KILL_AT": str(kill_at), "NLORA_TEST_KILL_NOTE": str(note)}
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "--port", "0", "--http-port", "off", "--dtype", "float32", "--adapter-dir", str(store),
         "--max-model-len", "256", "--log-level", "WARNING",
         "--kv-cache-memory-bytes", str(32 << 20)],  # it generates nothing: 45 blocks, not 1 GiB of zeroed pages
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    match = re.match(r"ready on 127\.0\.0\.1:(\d+);", proc.stdout.readline())
    assert match, "the server did not start"
    return proc, int(match.group(1))


def _next_op(rng: random.Random, state: dict[str, str]) -> tuple[str, str]:
    """A random operation valid in ``state`` (name -> "absent", "unloaded" or a state key)."""
    name = rng.choice(NAMES)
    served = state[name] not in ("absent", "unloaded")
    choices = ["upload"] + (["swap", "swap", "unload"] if served else [])
    choices += ["load"] if state[name] == "unloaded" else []
    return name, rng.choice(choices)


def _run_trial(seed: int, tmp: Path, payloads, base) -> tuple[str, str, str]:
    """One trial; returns (outcome, operation in flight, the file operation killed before)."""
    swaps, hashes = payloads
    rng = random.Random(seed)
    store, note = tmp / f"store{seed}", tmp / f"note{seed}"
    proc, port = _start(store, rng.randint(1, 55), note)
    acked = {name: "absent" for name in NAMES}
    loadable = dict(acked)  # what LoadAdapter of an unloaded name brings back
    flight = None
    try:
        with NloraClient(f"127.0.0.1:{port}", timeout=60) as client:
            for _ in range(OPS_PER_TRIAL):
                name, op = _next_op(rng, acked)
                if op == "upload":
                    flight, call = (name, op, "upload"), lambda: client.upload_adapter(name, CASES / TIED)
                elif op == "swap":
                    factor = rng.choice(FACTORS)
                    flight, call = (name, op, f"swap{factor}"), lambda: client.swap_adapter(name, swaps[factor])
                elif op == "unload":
                    flight, call = (name, op, "unloaded"), lambda: client.unload_adapter(name)
                else:
                    flight, call = (name, op, loadable[name]), lambda: client.load_adapter(name)
                call()
                if op == "unload":
                    loadable[name] = acked[name]
                acked[name], flight = flight[2], None
    except Exception:  # noqa: BLE001 - the server died under the call: that call is in flight
        pass
    finally:
        if proc.poll() is None:  # the kill point lay past the trial's last store operation
            proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    killed_before = note.read_text() if note.exists() else "(after the last operation)"
    _check_files(store, base.fingerprint)
    outcome = _reopen_and_compare(store, acked, flight, hashes, base)
    return outcome, flight[1] if flight else "none", killed_before


def _check_files(store: Path, base_fingerprint: str) -> None:
    """As the kill left it: nothing half-written, nothing but versions, markers and the store's
    base-model record (of ``base_fingerprint``) outside staging."""
    for entry in store.iterdir():  # nothing half-written, nothing but versions and markers
        if entry.name == STAGING:
            continue
        if entry.name == BASE_FILE:  # the store's base model (written whole, by a rename)
            assert json.loads(entry.read_text())["fingerprint"] == base_fingerprint, entry
            continue
        for child in entry.iterdir():
            assert child.name == UNLOADED or (child.name.isdigit() and child.is_dir()), child
            if child.is_dir():
                assert sorted(p.name for p in child.iterdir()) == sorted((*ALLOWED_FILES, SUMS_FILE)), child


def _reopen_and_compare(store: Path, acked: dict[str, str], flight, hashes: dict[str, str], base) -> str:
    """Restarts on the store (the registry rebuilt from it, as ``serve`` does) and compares each
    name with its acknowledged state; returns "old" / "new" (the in-flight op's result) / "-"."""
    manager = AdapterManager(base, store)  # it prunes versions older than each name's newest
    manager.registry.store.wait_deleted()  # (deleted by a background thread, from the staging area)
    assert list((store / STAGING).iterdir()) == []  # no temp files pile up
    for version in manager.versions():  # every served version reads back whole
        read_adapter(version.path, base)
    served = {v.name: v.content_hash for v in manager.versions()}
    outcome = "-"
    for name in NAMES:
        want = {"absent": None, "unloaded": None}.get(acked[name], hashes.get(acked[name]))
        got = served.get(name)
        allowed = {want}
        if flight is not None and flight[0] == name:
            new = flight[2]
            allowed.add(None if new in ("absent", "unloaded") else hashes[new])
            outcome = "old" if got == want else "new"
        assert got in allowed, (name, acked[name], flight, got)
    return outcome


def test_sigkill_at_random_store_points_leaves_every_name_at_its_last_acknowledged_version(
        base_fp32, payloads, tmp_path, capsys):
    table, failures = collections.Counter(), []
    for seed in range(TRIALS):  # every trial runs, so that the full run's table is whole
        try:
            outcome, op, killed_before = _run_trial(seed, tmp_path, payloads, base_fp32)
        except AssertionError as exc:
            failures.append(f"seed {seed}: {exc}")
            outcome, op, killed_before = "FAIL", "?", "?"
        table[(op, killed_before, outcome)] += 1
    with capsys.disabled():
        print(f"\ncrash trials: {TRIALS}; (operation in flight, killed just before, store after restart) -> trials")
        for key, count in sorted(table.items()):
            print(f"  {key[0]:7s} {key[1]:28s} {key[2]:4s} {count}")
    assert not failures, failures
