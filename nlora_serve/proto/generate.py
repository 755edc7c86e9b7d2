"""Regenerate the committed gRPC stubs from ``nlora.proto`` (run after editing the proto).

    python -m nlora_serve.proto.generate

Stubs are generated from the repository root so their imports read ``from nlora_serve.proto
import nlora_pb2``; a test regenerates them into a temporary folder and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO = Path("nlora_serve/proto/nlora.proto")
ROOT = Path(__file__).resolve().parents[2]


def generate(out_dir: Path) -> list[Path]:
    """Write ``nlora_pb2.py``, ``nlora_pb2.pyi`` and ``nlora_pb2_grpc.py`` under ``out_dir``.

    Returns the generated files. Raises RuntimeError when protoc fails.
    """
    from grpc_tools import protoc

    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {ROOT / PROTO}")
    stem = Path(out_dir) / PROTO.parent / PROTO.stem
    return [stem.with_name(f"{PROTO.stem}{suffix}") for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]


if __name__ == "__main__":
    for path in generate(ROOT):
        print(path)
    sys.exit(0)
