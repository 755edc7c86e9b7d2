"""What freezing the start-up heap (serve.freeze_startup_heap, as vLLM does) saves: the pause of a
full garbage collection in a serving process, and the time from "drained, exiting" to the end of
the process, with and without it, side by side.

1. In process: ``serve.build`` on the default model (engine, example tenants, both front ends,
   not started), then ``--collections`` full collections timed as they are, then frozen. Every
   stream stalls for the length of a full collection while it runs (the engine's step thread too:
   the GIL).
2. ``--rounds`` rounds, each starting ``nlora-serve serve`` twice as a process (frozen, and with
   the freeze patched out), waiting for its ready line, sending SIGINT, and timing the exit.

    .venv/bin/python bench/gc_pause.py [--collections 3] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

SERVE_FLAGS = ["--model", "default", "--port", "0", "--http-port", "0"]
# the serve command with freeze_startup_heap replaced by a no-op (run_serve looks it up at call time)
UNFROZEN = ("import sys; from nlora_serve.serving.commands import serve; serve.freeze_startup_heap = lambda: None; "
            "sys.exit(serve.main(sys.argv[1:]))")
FROZEN = "import sys; from nlora_serve.serving.commands import serve; sys.exit(serve.main(sys.argv[1:]))"


def collection_ms(n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def in_process(collections: int, store: str) -> dict:
    from nlora_serve.serving.commands import serve
    from nlora_serve.serving.commands.serve_flags import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    engine, _, _, batch = serve.build(parser.parse_args([*SERVE_FLAGS, "--adapter-dir", store]))
    batch.commit()  # as serve commits the start's adapters once its servers are started
    try:
        tracked = len(gc.get_objects())
        before = collection_ms(collections)
        serve.freeze_startup_heap()
        after = collection_ms(collections)
        gc.unfreeze()
    finally:
        engine.shutdown()
    return {"tracked_objects": tracked, "full_collection_ms": before, "frozen_full_collection_ms": after}


def exit_seconds(code: str, store: str, timeout: float = 600.0) -> float:
    """Seconds from the "exiting" log line to the process's end, after SIGINT once ready."""
    proc = subprocess.Popen([sys.executable, "-c", code, *SERVE_FLAGS, "--adapter-dir", store],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # ready: stdout
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            if "ready" in line:
                proc.send_signal(signal.SIGINT)
            if "exiting" in line:
                start = time.monotonic()
                break
            if time.monotonic() > deadline:
                raise TimeoutError("serve never became ready")
        else:
            raise RuntimeError(f"serve ended without draining (exit status {proc.wait()})")
        proc.stdout.read()  # to the end of its output: the process has closed it
        proc.wait(timeout=timeout)
        return time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collections", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = in_process(args.collections, os.path.join(tmp, "store"))
        exits = {"frozen": [], "unfrozen": []}
        for r in range(args.rounds):  # interleaved, so a change in the machine's load hits both
            for name, code in (("unfrozen", UNFROZEN), ("frozen", FROZEN)):
                exits[name].append(exit_seconds(code, os.path.join(tmp, f"store-{name}-{r}")))
    result["exit_s"] = exits
    before, after = statistics.median(result["full_collection_ms"]), statistics.median(result["frozen_full_collection_ms"])
    print(f"tracked objects after start-up: {result['tracked_objects']:,}")
    print(f"full collection: {before:.1f} ms as is, {after:.2f} ms frozen (median of {args.collections})")
    slow, fast = statistics.median(exits["unfrozen"]), statistics.median(exits["frozen"])
    print(f"exit after 'drained': {slow:.2f} s as is, {fast:.2f} s frozen ({slow / fast:.1f}x; "
          f"rounds: {[round(x, 2) for x in exits['unfrozen']]} / {[round(x, 2) for x in exits['frozen']]})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
