"""The gRPC contract: ``nlora.proto`` and its generated stubs (``nlora_pb2*.py``), the one thing the
server (``serving/``) and the clients (``client/``) share (DESIGN §2, §6).

The stubs are committed; ``python -m nlora_serve.proto.generate`` regenerates them after the proto
changes (generate.py).
"""
