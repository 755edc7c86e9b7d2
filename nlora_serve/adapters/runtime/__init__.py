"""What a running server holds of its adapters (vLLM's runtime LoRA loading, S-LoRA's adapter pool):
which version each name serves, the requests' pins on it, and which version sits in which pool slot.

Imported by the engine and the serving layer; the folder format, the tools and the store beside it
(``nlora_serve.adapters``) never import it. Nothing here imports ``engine/`` or ``serving/``.

Modules, in the order an admin call or a request meets them::

    manager.py        AdapterManager: the engine's one handle: store + registry + residency wired
                      together (register, swap, unload, acquire / release, reserve / place, hold)
    registry.py       AdapterRegistry: name -> current version: register, hot-swap, unload, free
    registry_pins.py  the requests' pins and refcounts on versions (acquire / release, hold / let_go)
    version.py        AdapterVersion (one per registration or hot-swap, immutable), Hold, the
                      registry's errors (AdapterNotFound, VersionConflict)
    swap.py           a hot-swap's N-only payload checked against the version it replaces
    residency.py      Residency: which version sits in which pool slot, within the memory limits
                      (LRU for LoRA slots, the tied budget, tenant shares); PoolFull, SlotBusy
    pool.py           TiedPool, LoraPool, Placement: slots laid out as the kernels read them
    family_pool.py    FamilyPool: one compressed family's shared factors and its members' N slots
"""
