"""The grammar compiler of structured outputs (engine/structured_output/structured.py): xgrammar compiles each spec
against the model's vocabulary on a thread of its own, within a timeout, in compile slots shared
across tenants, niced once it runs long; the compiled grammars are kept per tenant, bounded in count
and bytes (:class:`GrammarCompiler`).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict

from nlora_serve.engine.sample.sampling import RequestError
from nlora_serve.engine.structured_output.structured import StructuredOutputs, allows_a_token
from nlora_serve.engine.thread_priority import (lower_thread_priority, name_thread, named_threads, renice_named,
                                               thread_nice)

# compiled grammars kept (a typical schema's is ~55 KB on a 49k vocabulary)
MAX_CACHED = 256
# and their bytes at most (vLLM's VLLM_XGRAMMAR_CACHE_MB default): one 64 KB regex compiles to ~18 MB
# (a 2,000-property schema to ~17 MB), so 256 of them held ~4.5 GB
MAX_CACHED_BYTES = 512 * 1024 * 1024
COMPILE_TIMEOUT_S = 5.0  # a caller's wait for one compile (vLLM's regex compile timeout)
MAX_COMPILING = 2  # compiles running at once within their caller's timeout; one per tenant
# compiles past their caller's timeout (finishing in the background) that gave their slot back; one
# past it while these are all taken keeps its slot. Two tenants' slow specs (a 50 KB schema compiles
# for minutes) held both slots, and every other tenant's new spec was refused for that long
MAX_OVERDUE = 4
# a compile whose threads (its own and xgrammar's workers) have used COMPILE_GRACE_CPU_S together, or
# that runs past its caller's timeout, runs this much nicer than the server from then on (Linux): a
# 50 KB schema of 1,000 patterned strings compiles for minutes in the background, and on 2 cores its
# 2 workers took the CPU of the engine's step thread: another tenant's 150-token stream took 184 s
# instead of 28 s (46 s reniced)
COMPILE_NICENESS = 19
# and not before: niced from its start, a regex of 0.19 CPU-s took 7 to 27 s beside 2 busy cores and was
# refused past the 5 s timeout (as on CI, 2026-12-07); at the server's nice 0.5 to 1.3 s. CPU time,
# not wall time: a wall-clock grace of 0.5 s let it pass the grace on the busy box and crawl (2.6 to
# 10 s); 1 CPU-s costs another tenant's stream ~0.5 s once per slow compile (bench/compile_priority.py)
COMPILE_GRACE_CPU_S = 1.0
# how often the caller reads its compile's CPU time during the grace (a read: ~2 ms of CPU among 100
# threads; a compile on 2 cores may pass the grace by up to 0.2 CPU-s)
_GRACE_POLL_S = 0.1
_names = itertools.count()  # a compile thread's name: nlgram-<n>, unique while it runs


class CompileBusy(RequestError):
    """A spec refused for the server's load, not for itself: no compile slot freed in time, or its
    tenant has another spec compiling. The front ends answer 429 / RESOURCE_EXHAUSTED
    ``compile_busy`` (serving/status.py), which clients retry as a full queue; a 400 the OpenAI SDK
    never retries."""


class GrammarCompiler:
    """Compiles specs against one vocabulary; thread-safe (callers compile on their own threads).

    ``tokenizer``: the model's Hugging Face tokenizer; ``vocab_size``: the logits' width, which may
    exceed the tokenizer's (ids past it are never allowed); ``stop_ids``: the tokens that end a
    grammar's output (the engine's EOS ids). The vocabulary is read on the first compile (~0.5 s on
    a 49k vocabulary), not at start: engines that never see a grammar never pay it.

    A compile runs on a thread of its own, at most :data:`MAX_COMPILING` at once and one per tenant, and
    its caller waits ``timeout_s`` at most (vLLM's VLLM_REGEX_COMPILATION_TIMEOUT_S, 5 s, for every kind
    here): some short specs explode (``.{0,2000}`` takes ~4 s, and the time grows with the count). A
    compile that runs past it cannot be stopped (xgrammar's C++); it finishes in the background, still
    holding its tenant's turn, and lands in the cache: a tenant whose compile still runs is refused
    another spec at once, so that one tenant's slow specs hold one slot, never all of them; and it gives
    its slot back to run on as one of at most :data:`MAX_OVERDUE` such compiles (keeping it while those
    are all running), so that the slow specs of a few tenants do not hold every slot for the minutes
    they take. On Linux a compile runs at its caller's priority until its threads have used
    :data:`COMPILE_GRACE_CPU_S` (or its caller's timeout passed), so that a small spec compiles as
    fast as any other work on a busy server, and from then on, its thread and the workers xgrammar
    started from it, at :data:`COMPILE_NICENESS` above it, so that a slow compile takes the CPU the
    engine's step thread leaves, not the CPU the other tenants' streams need. A tenant's callers of the
    same spec share its compile. Compiled grammars are kept by tenant and spec, at most
    :data:`MAX_CACHED` within :data:`MAX_CACHED_BYTES` (past either, the least recently used of the
    tenant holding the most goes first: one tenant's new specs evict its own), and on the spec itself
    (``spec.compiled``): a tenant never shares another's compile or cached grammar (as the prefix cache
    is salted per tenant), whose answer in microseconds, against a miss's compile time, would tell it
    that another tenant had sent the same spec.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int], timeout_s: float = COMPILE_TIMEOUT_S) -> None:
        self._tokenizer, self.vocab_size, self._stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self.timeout_s = timeout_s
        self._compiler = None
        self._lock = threading.Lock()
        self._cached: OrderedDict = OrderedDict()  # spec key -> xgrammar CompiledGrammar, least recent first
        self.cached_bytes = 0  # their memory_size_bytes together
        self._compiling = threading.BoundedSemaphore(MAX_COMPILING)
        self._overdue = threading.BoundedSemaphore(MAX_OVERDUE)  # slots of compiles past their timeout
        self._jobs: dict[tuple, _Job] = {}  # spec key -> its compile, from its slot's wait to its end
        self._tenants: dict[str, tuple] = {}  # tenant -> the key of its compile (waiting or running)

    def _get(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler

    def compile(self, spec: StructuredOutputs, tenant: str | None = None):
        """The compiled grammar of ``spec`` (the same tenant's repeated spec costs a lookup); ``tenant``:
        who asks, the cache's sharing group (None: nobody to hold to one compile, e.g. the engine's own
        lookups, which find the grammar on the spec).

        Raises:
            RequestError: the spec does not compile (a bad schema, regex or grammar), allows no token
                at its start, or not within ``timeout_s``. The message names the field and says why,
                ``param`` is ``spec.param``.
            CompileBusy: (a RequestError) ``tenant`` has another spec compiling, or no compile slot
                frees within ``timeout_s``.
        """
        if spec.compiled is not None and spec.compiled[0] is self:
            return spec.compiled[1]
        # per tenant, as the prefix cache is: a hit on another tenant's compile would answer in
        # microseconds where a miss takes 10 ms to seconds, telling whether it had sent this spec
        key = (tenant, spec.kind, spec.text, spec.disable_any_whitespace)
        with self._lock:
            if key in self._cached:
                self._cached.move_to_end(key)
                return self._keep(spec, self._cached[key])
            job = self._jobs.get(key)
            if job is None:
                self._claim(spec, key, tenant)
        watch = job is None
        if job is None:
            job = self._start(spec, key, tenant)
        if not self._wait(job, watch):
            self._overdue_slot(job)
            raise RequestError(f"{spec.param}: the {spec.kind} did not compile within {self.timeout_s:g} s (too "
                               "complex: a large repetition count or nesting)", spec.param)
        if job.error is not None:
            raise RequestError(f"{spec.param}: {job.error}", spec.param)
        return self._keep(spec, job.grammar)

    def _wait(self, job: _Job, watch: bool) -> bool:
        """Whether ``job`` ended within ``timeout_s``. ``watch`` (its first caller, who started it): nice
        it once its threads have used :data:`COMPILE_GRACE_CPU_S` together; any caller: at the timeout
        (again: a worker it was starting during the first renice may have kept the server's nice value)."""
        deadline = time.monotonic() + self.timeout_s
        used: dict[int, float] = {}  # thread -> CPU seconds (a worker that ended keeps its last count)
        while watch and not job.niced:
            if job.done.wait(max(0.0, min(_GRACE_POLL_S, deadline - time.monotonic()))):
                return True
            if time.monotonic() >= deadline:
                break
            used.update(named_threads(job.name))
            if sum(used.values()) >= COMPILE_GRACE_CPU_S:
                self._nice(job)
        if job.done.wait(max(0.0, deadline - time.monotonic())):
            return True
        self._nice(job)
        return False

    def _nice(self, job: _Job) -> None:
        """Renice ``job``'s threads (its own, xgrammar's workers: all named ``job.name``) to ``job.nice``;
        a job whose thread has not started yet nices itself when it does."""
        with self._lock:
            job.niced = True
            started = job.started
        if started:
            renice_named(job.name, job.nice)

    def _keep(self, spec: StructuredOutputs, grammar):
        object.__setattr__(spec, "compiled", (self, grammar))
        return grammar

    def _claim(self, spec: StructuredOutputs, key: tuple, tenant: str | None) -> None:
        """Hold ``tenant`` to one compile (under the lock). Raises CompileBusy: it has one already."""
        if tenant is None:
            return
        if tenant in self._tenants:
            raise CompileBusy(f"{spec.param}: an earlier spec of this tenant is still compiling (one at a time "
                               "per tenant); retry when it is done", spec.param)
        self._tenants[tenant] = key

    def _start(self, spec: StructuredOutputs, key: tuple, tenant: str | None) -> _Job:
        """A slot (waited for up to ``timeout_s``) and the compile's thread; or the job another caller
        started for ``key`` meanwhile. Raises CompileBusy: no slot frees in time."""
        try:
            compiler = self._get()  # bounded work (the vocabulary), outside the timed part
            if not self._compiling.acquire(timeout=self.timeout_s):
                raise CompileBusy(f"{spec.param}: the server is busy compiling other specs; retry", spec.param)
        except BaseException:
            self._unclaim(key, tenant)
            raise
        with self._lock:
            job = self._jobs.get(key)
            if job is not None or key in self._cached:  # the same spec, compiled or started meanwhile
                self._compiling.release()
                if tenant is not None and self._tenants.get(tenant) == key:
                    del self._tenants[tenant]
                return job if job is not None else _Job.finished(self._cached[key])
            job = self._jobs[key] = _Job(f"nlgram-{next(_names) % 10 ** 8}", thread_nice() + COMPILE_NICENESS)
        threading.Thread(target=self._run, args=(compiler, spec, key, tenant, job), name="nlora-grammar",
                         daemon=True).start()
        return job

    def _overdue_slot(self, job: _Job) -> None:
        """Move ``job``, past its caller's timeout, from its compile slot to an overdue one, if one is free."""
        with self._lock:
            if not job.ended and not job.overdue and self._overdue.acquire(blocking=False):
                job.overdue = True
                self._compiling.release()

    def _unclaim(self, key: tuple, tenant: str | None) -> None:
        with self._lock:
            if tenant is not None and self._tenants.get(tenant) == key:
                del self._tenants[tenant]

    def _run(self, compiler, spec: StructuredOutputs, key: tuple, tenant: str | None, job: _Job) -> None:
        try:
            name_thread(job.name)  # before xgrammar's workers start: they inherit it
            with self._lock:
                job.started = True
                niced = job.niced
            if niced:
                lower_thread_priority(job.nice)
            grammar = _compile(compiler, spec)
            if not _allows_a_token(grammar, self.vocab_size):
                job.error = (f"the {spec.kind} matches no text this model's tokens can write (no token, not even "
                             "the end of the output, is allowed at its start)")
            else:
                job.grammar = grammar
        except (RuntimeError, ValueError) as exc:  # xgrammar's parse errors: "[time] file:line: why"
            text = str(exc).strip()
            why = text.rsplit(": ", 1)[-1] if ": " in text else text
            job.error = f"the {spec.kind} does not compile: {why.strip()[:300]}"
        finally:
            with self._lock:
                if job.grammar is not None:
                    self._cached[key] = job.grammar
                    self.cached_bytes += job.grammar.memory_size_bytes
                    while len(self._cached) > 1 and (len(self._cached) > MAX_CACHED
                                                     or self.cached_bytes > MAX_CACHED_BYTES):
                        self._drop_one(keep=key)
                del self._jobs[key]
                if tenant is not None and self._tenants.get(tenant) == key:
                    del self._tenants[tenant]
                job.ended = True  # under the lock: its slot moves no more
            (self._overdue if job.overdue else self._compiling).release()
            job.done.set()

    def _drop_one(self, keep: tuple) -> None:
        """Drop one cached grammar other than ``keep`` (under the lock, with more than one cached): the
        least recently used of the tenant holding the most, in entries while over :data:`MAX_CACHED`,
        else in bytes (ties: the one whose grammar was used least recently). Plain LRU dropped
        whatever was oldest, so a tenant sending a stream of new specs (28 regexes of 64 KB fill the
        bytes) evicted every other tenant's, and each of their requests compiled again (up to 5 s)."""
        over_count = len(self._cached) > MAX_CACHED
        held: dict = {}
        for (owner, *_), grammar in self._cached.items():
            count, size = held.get(owner, (0, 0))
            held[owner] = (count + 1, size + grammar.memory_size_bytes)
        victim = max(held, key=lambda owner: held[owner][0 if over_count else 1])
        key = next((k for k in self._cached if k[0] == victim and k != keep), None)
        if key is None:  # the victim holds only the grammar just added: the least recent of the others
            key = next(k for k in self._cached if k != keep)
        self.cached_bytes -= self._cached.pop(key).memory_size_bytes

    def matcher(self, spec: StructuredOutputs, stop_ids: frozenset[int] | None = None):
        """A fresh ``xgrammar.GrammarMatcher`` of ``spec`` whose stop tokens are ``stop_ids`` (a
        request's: see engine/structured_output/structured.py's docstring; None: the compiler's ``stop_ids``); raises as
        :meth:`compile`."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(spec), override_stop_tokens=sorted(stop_ids) if stop_ids else None)


class _Job:
    """One compile in flight: its result once ``done`` is set (a grammar, or an error's words).
    ``name``: its thread's, inherited by xgrammar's workers; ``nice``: their nice value once niced."""

    __slots__ = ("done", "grammar", "error", "overdue", "ended", "name", "nice", "started", "niced")

    def __init__(self, name: str = "", nice: int = 19) -> None:
        self.done, self.grammar, self.error = threading.Event(), None, None
        self.name, self.nice = name, min(19, nice)
        self.started = False  # its thread named (set under the compiler's lock)
        self.niced = False  # past its grace or timeout: its thread nices itself at its start if not started yet
        self.overdue = False  # holds an overdue slot (past its caller's timeout), not a compile slot
        self.ended = False  # its slot released (set under the compiler's lock)

    @classmethod
    def finished(cls, grammar) -> _Job:
        job = cls()
        job.grammar, job.ended = grammar, True
        job.done.set()
        return job


def _allows_a_token(grammar, vocab_size: int) -> bool:
    """Whether a fresh matcher of ``grammar`` allows any token (EOS included) first: a regex or
    grammar of characters no token holds allows none, and its request could only fail."""
    import xgrammar as xgr

    return allows_a_token(xgr.GrammarMatcher(grammar), vocab_size)


def _compile(compiler, spec: StructuredOutputs):
    if spec.kind in ("json", "json_object"):
        compact = spec.disable_any_whitespace
        return compiler.compile_json_schema(spec.text, any_whitespace=not compact,
                                            separators=(",", ":") if compact else None)
    if spec.kind == "regex":
        return compiler.compile_regex(spec.text)
    return compiler.compile_grammar(spec.text)
