"""Re-reading the tenants file while serving (``kill -HUP <pid>``, as nginx, HAProxy and
Prometheus reload their configuration), so that adding a tenant or revoking a leaked key needs no
restart (which would drain every stream).

The new file is checked whole by the loader that read it at start (:meth:`Authenticator.from_file`)
before anything changes: a file it refuses (unreadable, not a regular file, bad JSON or TOML, a field it does not take,
a name with a control character or '/', no key at all) leaves the old keys in force and is logged
at ERROR, naming why. A file it accepts is in force for every request that arrives after it, on
both front ends; a request already admitted runs to its end
on the key and grants it was admitted with. Only the :class:`Authenticator` and the engine's
fair-scheduling weights hold the file: grants, ListAdapters' and /v1/models' visibility, the
prefix-cache group (the tenant's name), ``max_concurrent_requests`` and the queue share are read
from the principal each call authenticates, so swapping the Authenticator's keys changes them all;
the weights go to the engine (:meth:`Engine.set_tenant_weights`: the scheduler, the prefix cache's
and the LoRA slots' shares). Per-tenant counters are keyed by name and released by the request that
took them, so a tenant removed with requests in flight counts them down as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from nlora_serve.engine.api import Engine
from nlora_serve.serving.auth import AuthError, Authenticator, Principal

log = logging.getLogger("nlora_serve.tenants")
# SIGHUP's reloads run here, one at a time in the order the signals came, never on the event loop:
# reading, parsing and checking a tenants file of 10,000 tenants (1.4 MB) held the loop 0.1-0.3 s,
# of 50,000 1.5 s, and every stream of every tenant stalled that long
_RELOAD_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlora-tenants-reload")


def reload_off_loop(reload: Callable[[], bool]) -> Future:
    """Run ``reload`` (a server's :func:`reload_tenants`) on the reload thread, after any reload
    asked for before it; returns its future. The signal handler's way in: it returns at once. An
    unexpected exception is logged (ERROR, with its traceback), as the event loop logged one raised
    by the handler itself."""
    job = _RELOAD_THREAD.submit(reload)
    job.add_done_callback(_log_failure)
    return job


def _log_failure(job: Future) -> None:
    exc = job.exception()
    if exc is not None:
        log.error("tenants file reload failed", exc_info=exc)


def reload_tenants(auth: Authenticator, path: str | None, engine: Engine) -> bool:
    """Re-read the tenants file ``path`` into ``auth`` (in place: every holder sees it) and the
    engine's tenant weights. Returns True when the new file is in force.

    Logs a WARNING and changes nothing without a tenants file (auth off stays off: turning it on
    needs a restart); an ERROR naming the problem, changing nothing, when the loader refuses the
    file; one INFO line naming the tenants and admins added, removed and changed (never a key or
    a hash) when it is in force.
    """
    if path is None or not auth.enabled:
        log.warning("tenants reload asked for (SIGHUP), but the server was started without --tenants-file: auth "
                    "stays OFF (restart with --tenants-file to turn it on); nothing reloaded")
        return False
    try:
        new = Authenticator.from_file(path)
    except AuthError as exc:
        log.error("tenants file NOT reloaded, the keys read before stay in force: %s", exc)
        return False
    summary = changes(auth, new)
    auth.replace_keys(new)
    engine.set_tenant_weights(new.weights())
    log.info("tenants file %s reloaded: %s", path, summary)
    return True


def changes(old: Authenticator, new: Authenticator) -> str:
    """What ``new`` changes against ``old``, by name: "added 'b'; removed 'a' (admin); changed 'c'
    (weight 1 -> 2, keys: 1 added, 1 revoked)", or "no changes"."""
    before, after = old.entries(), new.entries()
    parts = [f"{label} {', '.join(_who(name, entries[name][0]) for name in sorted(names))}"
             for label, names, entries in (("added", after.keys() - before.keys(), after),
                                           ("removed", before.keys() - after.keys(), before)) if names]
    changed = [f"{_who(name, after[name][0])} ({what})" for name in sorted(before.keys() & after.keys())
               if (what := _what_changed(before[name], after[name]))]
    if changed:
        parts.append(f"changed {', '.join(changed)}")
    return "; ".join(parts) or "no changes"


def _who(name: str, principal: Principal) -> str:
    return f"{name!r} (admin)" if principal.is_admin else repr(name)


def _what_changed(old: tuple[Principal, frozenset[str]], new: tuple[Principal, frozenset[str]]) -> str:
    (was, old_keys), (now, new_keys) = old, new
    what = []
    if was.is_admin != now.is_admin:
        what.append("tenant -> admin" if now.is_admin else "admin -> tenant")
    if (was.adapters, was.base_model) != (now.adapters, now.base_model):
        what.append("grants")
    if was.weight != now.weight:
        what.append(f"weight {was.weight:g} -> {now.weight:g}")
    if was.max_concurrent_requests != now.max_concurrent_requests:
        what.append(f"max_concurrent_requests {was.max_concurrent_requests} -> {now.max_concurrent_requests}")
    if old_keys != new_keys:
        what.append(f"keys: {len(new_keys - old_keys)} added, {len(old_keys - new_keys)} revoked")
    return ", ".join(what)
