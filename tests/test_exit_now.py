"""serve's exit past a thread that never returns (serving/commands/exit_now.py), in a process of
its own: no torch, ~0.2 s a process."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

# A worker of a thread pool waits for ever (as one waiting on a hung engine step would): the
# interpreter's exit joins it (concurrent.futures' exit hook), so a plain exit never ends.
STUCK = """
import concurrent.futures, sys, threading
from nlora_serve import log_format
from nlora_serve.serving.commands.exit_now import exit_now

log_format.configure("INFO", timed=True)
pool = concurrent.futures.ThreadPoolExecutor(1)
pool.submit(threading.Event().wait)
print("buffered, no newline", end="")
{exit}
"""


def test_exit_now_ends_a_process_whose_exit_would_wait_for_ever_with_its_status_and_log_line():
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", STUCK.format(exit="exit_now(1, 'the step thread is stuck')")],
                          capture_output=True, text=True, timeout=20)
    assert time.monotonic() - started < 10
    assert done.returncode == 1
    assert done.stdout == "buffered, no newline"  # flushed, though os._exit flushes nothing
    assert done.stderr.rstrip("\n").endswith("ERROR nlora_serve.serve: exiting now with status 1, without waiting "
                                             "for the interpreter's teardown: the step thread is stuck"), done.stderr


def test_the_same_process_with_a_plain_exit_waits():
    # the premise of the test above: without exit_now this process does not end. The 1.5 s are
    # counted from its exit call (a line it writes first), not from its start, which on a loaded box
    # could take that long alone
    exit_call = "sys.stderr.write('exit called\\n'); sys.stderr.flush(); sys.exit(1)"
    child = subprocess.Popen([sys.executable, "-c", STUCK.format(exit=exit_call)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stderr.readline() == "exit called\n"
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=1.5)
    finally:
        child.kill()
        child.wait()
        child.stderr.close()
