"""``serve`` with a store fault hook that SIGKILLs the process just before its N-th store file
operation (environment ``NLORA_TEST_KILL_AT``; the operation is written to
``NLORA_TEST_KILL_NOTE`` first), for tests/grpc/test_grpc_crash.py.

    python -c "import sys; sys.path.insert(0, 'tests/grpc'); import crash_serve; crash_serve.main()" ARGS
"""

from __future__ import annotations

import os
import signal
import sys

from nlora_serve.adapters.store import durable
from nlora_serve.serving.commands import serve as serve_cli


def main() -> None:
    kill_at, note = int(os.environ["NLORA_TEST_KILL_AT"]), os.environ["NLORA_TEST_KILL_NOTE"]
    seen = 0

    def kill(op) -> None:
        nonlocal seen
        seen += 1
        if seen == kill_at:
            with open(note, "w") as f:
                f.write(op.kind)
            os.kill(os.getpid(), signal.SIGKILL)

    durable.set_fault_hook(kill)
    sys.exit(serve_cli.main(sys.argv[1:]))
