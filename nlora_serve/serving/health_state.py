"""What ``GET /health`` answers, on the HTTP API's port and on ``--metrics-port`` alike: the
server's state for a load balancer's or Kubernetes' HTTP probe (gRPC's ``grpc.health.v1`` says the
same on ``--port``: SERVING, then NOT_SERVING once draining or dead).

- ``200 {"status": "ok"}``: serving.
- ``503 {"status": "draining"}``: SIGTERM / Ctrl-C received; running requests finish, new ones are
  refused (503, code ``draining``) until ``--drain-seconds`` ends and the process exits 0.
- ``503 {"status": "dead", "reason": ...}``: the engine can serve no request any more
  (:attr:`~nlora_serve.engine.api.Engine.dead_reason`); the server aborts the requests it holds,
  without a drain (none could finish), and exits 1.

Before the model and engine are up nothing listens at all (connection refused): a probe then fails,
as it should for readiness, and a liveness probe needs a ``startupProbe`` (or a delay) in front of it.
"""

from __future__ import annotations


def health_answer(dead_reason: str | None, draining: bool) -> tuple[int, dict[str, str]]:
    """(HTTP status, JSON body) of ``/health`` for an engine whose ``dead_reason`` is that (None:
    alive) and a server ``draining`` or not; dead wins over draining."""
    if dead_reason is not None:
        return 503, {"status": "dead", "reason": dead_reason}
    if draining:
        return 503, {"status": "draining"}
    return 200, {"status": "ok"}
