"""The bench tests reuse the gRPC tests' real loopback servers: tests/grpc's fixtures
(``make_server``, ``tokenizer``) and helpers (``grpc_harness``, ``serving_check``), loaded from there."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GRPC_TESTS = Path(__file__).parents[1] / "grpc"
sys.path.insert(0, str(GRPC_TESTS))  # grpc_harness / serving_check, as tests/grpc imports them

_spec = importlib.util.spec_from_file_location("grpc_test_fixtures", GRPC_TESTS / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
make_server = _fixtures.make_server
tokenizer = _fixtures.tokenizer
