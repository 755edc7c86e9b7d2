"""The gRPC front end's services (``proto/nlora.proto``), served by
:class:`~nlora_serve.serving.server.NloraServer` beside the HTTP API::

    generate.py   the Generation service: Generate (streamed), ListAdapters, GetServerInfo
    admin.py      the AdapterAdmin service: load, upload, hot-swap N, unload
    convert.py    proto messages <-> engine types
    send_deadline.py  a Generate stream whose client reads nothing for 60 s loses the call
    spool.py      an upload's chunks kept off the GIL until the worker thread reads them
    auth.py, decode.py, limits.py
                  refusals before a request is parsed (no key, over its size bound, bad protobuf)

Expected failures become gRPC codes through ``serving/status.py``, the table HTTP shares.
"""
