"""The gRPC contract: ``nlora.proto`` and its generated stubs (``nlora_pb2*.py``), the one thing the
server (``serving/``) and the clients (``client/``) share (DESIGN §2, §6).

The stubs are committed; ``python -m nlora_serve.proto.generate`` regenerates them after the proto
changes (generate.py).
"""

# Trailing metadata of a refused call: the server's reason (the ``reason`` label of
# nlora_requests_rejected_total, HTTP's error ``code``: ``queue_full``, ``tenant_quota``, ...), which
# tells apart the refusals one status code covers (RESOURCE_EXHAUSTED: the queue, a tenant's quota or
# its share of the queue).
REASON_KEY = "nlora-reason"
