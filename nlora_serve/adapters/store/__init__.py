"""The adapter store: one folder per adapter name, one sub-folder per version, written atomically
and durably, checked against its recorded sums at every read (DESIGN §6).

Modules, by concern::

    reads.py     AdapterStore: opens a root, lists names and versions, reads a version's files
    writes.py    StoreWrites (AdapterStore's writes): write a version, mark unloaded, remove
    layout.py    what lies where (file and folder names), StoredVersion, content_hash
    durable.py   the file operations, in durable order (write, fsync, rename, fsync the folder);
                 observable by tests through its hook
    sums.py      each version's SHA256SUMS: recorded with the files, checked on every read
    lock.py      one process per root (an flock), one AdapterStore per root in a process
    factors.py   a compressed family's shared factors under the store's _families/
    sweep.py     those no version uses any more, removed at the store's first open
    base_record.py  which base model the store serves (.base_model.json): another's is refused
    settings.py  how many versions of a name it keeps (.store_settings.json: the last --keep-versions)
    batch.py     a start's writes, taken back out should the start fail
    journal.py   the same on disk: a start killed before its commit is undone at the next open
    history.py   a name's kept versions (serve --keep-versions) listed, and rolled back offline

``from nlora_serve.adapters.store import AdapterStore, CONFIG_FILE, ...`` reads the names most
callers need from here.
"""

from nlora_serve.adapters.file_read import ALLOWED_FILES, CONFIG_FILE, WEIGHTS_FILE
from nlora_serve.adapters.limits import DEFAULT_MAX_ADAPTER_BYTES
from nlora_serve.adapters.store.layout import STAGING, UNLOADED, StoredVersion, content_hash
from nlora_serve.adapters.store.reads import AdapterStore

__all__ = ["ALLOWED_FILES", "CONFIG_FILE", "DEFAULT_MAX_ADAPTER_BYTES", "STAGING", "UNLOADED", "WEIGHTS_FILE",
           "AdapterStore", "StoredVersion", "content_hash"]
