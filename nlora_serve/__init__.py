"""nlora-serve: serve many NLoRA / IntTune adapters on one shared base LLM.

The folders are the architecture (DESIGN §2); each package's docstring maps its own modules::

    models/    base models: resolve, convert the default GGUF once, load weights by name, fingerprint
    adapters/  PEFT-style adapter folders (read, validate, write), Nyström init, the tied form,
               inspect, convert, compress, tune; the store, the registry (versions, pins, hot-swap)
               and the pools that hold resident adapters where the kernels read them
    kernels/   the compute ops: adapter deltas y += s·B·N·A·x (torch, Triton, native C), paged
               attention, the CPU GEMMs and layer ops
    engine/    the native engine (scheduler, paged KV cache, model runner, sampling, detokenizer,
               adapter hook, CUDA graphs) and the vLLM-backed engine, behind one Engine interface
    serving/   the gRPC and OpenAI-compatible HTTP front ends, auth, admission, metrics, the CLIs
               that start them
    proto/     nlora.proto and its generated stubs: all that server and client share
    client/    gRPC clients (sync, asyncio), the ``client`` CLI and the ``bench`` load tester
    cli.py     the ``nlora-serve`` command (log_format.py: its log lines, timed for ``serve``, or JSON);
               errors.py and arg_types.py are shared by all of these

Imports point one way: ``kernels`` imports nothing of ours; ``adapters`` may import ``models`` and
``kernels``, never ``engine`` or ``serving``; ``engine`` never imports ``serving``; only ``cli.py``
imports ``serving``; ``client`` reaches the server only through ``proto``.

Where to start reading:

- a chat completion from the socket to the sampled token and back: README, "One request through
  the code";
- where an adapter's term is computed, per device and token kind: ``engine/model/adapter_layer.py``'s
  module docstring;
- a hot-swap of a tenant's N: ``client/cli.py`` ``_swap`` → ``serving/grpc_api/admin.py``
  ``AdapterAdmin._swap`` → ``adapters/runtime/manager.py`` ``AdapterManager.swap`` →
  ``adapters/runtime/registry.py`` ``AdapterRegistry.swap_weights`` (``adapters/runtime/swap.py`` ``replace_n``
  validates the new N) → ``_commit``: ``adapters/runtime/residency.py`` ``Residency.admit`` writes it
  into a free slot of its ``adapters/runtime/pool.py`` ``TiedPool``, the store writes it durably, and the
  name switches to the new version. Requests admitted from then on carry the new slot into the
  step (``engine/model/adapter_layer.py`` ``AdapterHook.begin_step``) and the kernels read it from the
  same pool tensor (their views are rebuilt only when a pool grows: ``generation``); running
  requests keep the version they pinned, whose slot is freed when the last of them ends.
"""

__version__ = "0.1.0"
