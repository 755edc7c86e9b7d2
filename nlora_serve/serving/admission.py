"""Queue admission, shared by the gRPC and HTTP front ends (DESIGN §6).

Both front ends admit a request the same way (key; draining, the bounded queue and the tenant's
quota, reserved in :class:`Admission` before the prompt is tokenized, by HTTP before the body is
read, by gRPC after the grant and parameters of its message; the prompt; then the engine), count
it in the same :class:`Admission` (``--max-queue`` bounds gRPC and HTTP requests together) and
stream it through :class:`~nlora_serve.serving.stream.Metered`, so metrics and cancellation behave
the same whichever protocol a tenant speaks.
"""

from __future__ import annotations

import asyncio
import logging

from nlora_serve.engine.sample.sampling import RequestError
from nlora_serve.errors import RefusalLog
from nlora_serve.serving.auth import Principal
from nlora_serve.serving.status import Draining, QueueFull, QueueShareExceeded, QuotaExceeded
from nlora_serve.serving.tokenizer_turns import GRAMMAR_THREADS, TokenizerTurns

log = logging.getLogger(__name__)


def queue_share(weight: float, free: int) -> float:
    """The places of ``--max-queue`` a tenant of ``weight`` may hold when ``free`` are free as it
    takes its next one: ``weight x free`` (Choudhury and Hahne's dynamic threshold), except that the
    last free place is kept for a tenant holding none (1.0 there: one place, which
    :meth:`Admission.check` grants only to such a tenant). Without that, a weight over
    ``--max-queue`` - 1 let one tenant take every place (weight 300 alone held all 256), and every
    other tenant got queue_full until its backlog drained. Units: requests."""
    return weight * free if free > 1 else 1.0


class Reservation:
    """One request's place in its :class:`Admission` counts, taken before its prompt is tokenized
    (:meth:`Admission.reserve`) and given back exactly once, whichever way the request ends: refused
    after reserving (a bad prompt, an unknown adapter, a context overflow), its client gone while it
    waited for the tokenizer, or its engine stream ended (:class:`~nlora_serve.serving.stream.Metered`).
    An HTTP request of ``n`` choices for each of P prompts holds P x n places (:meth:`Admission.grow`).
    Event-loop only."""

    __slots__ = ("admission", "tenant", "held", "places")

    def __init__(self, admission: Admission, tenant: str | None):
        self.admission, self.tenant, self.held, self.places = admission, tenant, True, 1
        admission.enter(tenant)

    def release(self) -> None:
        """Leave the admission counts; a second call does nothing."""
        if self.held:
            self.held = False
            self.admission.leave(self.tenant, self.places)


class Admission:
    """Counts admitted requests (running + waiting, both front ends) against ``max_queue``, in
    all and per tenant. A request counts from its :meth:`reserve`, before its prompt is tokenized
    (a 660 KB prompt takes ~0.45 s of the one tokenizer thread), so the queue bound and a tenant's
    quota refuse it before that work (HTTP: before its body is read).

    With ``tenant_shares`` (fair scheduling) a tenant may hold at most ``weight x (free places)``
    of the queue (at least one): the dynamic threshold of Choudhury and Hahne ("Dynamic queue
    length thresholds for shared-memory packet switches", IEEE/ACM ToN 1998), so one tenant never
    fills the queue before the fair scheduler sees the others: alone it gets half of it, and a
    newcomer always finds room (whatever the weights: :func:`queue_share` keeps the last place). A
    tenant's ``max_concurrent_requests`` bounds it in any case.
    Only touched from the server's event loop, so plain integers suffice.
    """

    def __init__(self, max_queue: int, tenant_shares: bool = False):
        self.max_queue = max_queue
        self.tenant_shares = tenant_shares
        self.tokenizer = TokenizerTurns()  # the stage before admission: prompts to token ids
        self.grammar = TokenizerTurns(GRAMMAR_THREADS)  # structured-output specs compiled, beside it
        self.inflight = 0
        self.held: dict[str, int] = {}  # requests running or waiting per tenant name
        self._refusals = RefusalLog(log)  # a refusal's detail its tenant is not told: the operator's
        self.draining = False
        self.drain_started = asyncio.Event()  # set by start_draining(): bodies still unread give up
        self.idle = asyncio.Event()
        self.idle.set()

    def start_draining(self) -> None:
        """Refuse new requests from now on (Draining), and wake the ones whose HTTP body has not
        arrived, so that a body held back cannot hold up a shutdown."""
        self.draining = True
        self.drain_started.set()

    def check(self, principal: Principal | None = None, places: int = 1) -> None:
        """Raises Draining or QueueFull when a new request (of ``principal``) may not take
        ``places`` more places now: QueueFull itself (reason ``queue_full``) only when the whole
        ``--max-queue`` is; QuotaExceeded (``tenant_quota``) when its tenant's
        ``max_concurrent_requests`` refuses it; QueueShareExceeded (``tenant_queue_share``) when,
        with ``tenant_shares``, its tenant holds its share of the free places. The operator's INFO
        line starts with the reason's word."""
        if self.draining:
            raise Draining("server is shutting down; retry on another replica")
        # a refusal tells the caller its own count and limit only: the queue's bound, beside the fact
        # that it is full, would tell it how many requests the other tenants have (the log has it all)
        who = principal.name if principal is not None else None
        if self.inflight + places > self.max_queue:
            self._refusals.info(("queue_full", who), "queue_full: %r refused %d place(s), %d of --max-queue %d held "
                               "(%d by it)", who, places, self.inflight, self.max_queue, self.held.get(who, 0))
            raise QueueFull("server queue is full (the server is busy); retry with backoff")
        if principal is None:
            return
        held, limit = self.held.get(principal.name, 0), principal.max_concurrent_requests
        if limit is not None and held + places > limit:
            raise QuotaExceeded(f"{principal.name!r} has {held} requests running or waiting, its "
                            f"max_concurrent_requests in the tenants file; retry when one ends")
        # places are taken as one by one: the last must still be under the share left by the others
        share = queue_share(principal.weight, self.max_queue - self.inflight - (places - 1))
        if self.tenant_shares and held + places - 1 >= max(1.0, share):
            self._refusals.info(("tenant_queue_share", who), "tenant_queue_share: %r refused %d place(s), holding "
                                "%d, its share %.3g of the %d free places of --max-queue %d (weight %g)", who, places,
                                held, share, self.max_queue - self.inflight, self.max_queue, principal.weight)
            raise QueueShareExceeded(f"{principal.name!r} holds {held} requests running or waiting, its share of "
                                     "the server's queue (its weight x the free places, so that other tenants "
                                     "always find room); retry when one ends, or with backoff")

    def reserve(self, principal: Principal | None = None) -> Reservation:
        """:meth:`check`, then count the request (of ``principal``'s tenant) until the returned
        reservation is released.

        Raises:
            Draining, QueueFull: from :meth:`check` (nothing is counted then).
        """
        self.check(principal)
        return Reservation(self, principal.name if principal is not None else None)

    def grow(self, reservation: Reservation, places: int, principal: Principal | None = None,
             asked: str | None = None, param: str = "n") -> None:
        """Count ``places`` more places for an admitted ``reservation`` (the other choices of an
        ``n`` > 1 request, the other prompts of a batch: each is a request in the engine), after
        :meth:`check`.

        Raises:
            RequestError: more places than ``principal``'s max_concurrent_requests, or (with
                ``tenant_shares``) its share of an otherwise empty queue, allows at all (``param``,
                the field to blame, and ``asked``, what it asked, e.g. ``"n=3"`` (the default) or
                ``"3 prompts x n=2"``: the request could never be admitted). Draining, QueueFull:
                from :meth:`check` (nothing is counted then).
        """
        total = reservation.places + places
        asked = f"n={total}" if asked is None else asked
        limit = principal.max_concurrent_requests if principal is not None else None
        if limit is not None and total > limit:
            raise RequestError(f"{asked} is {total} requests: more than tenant {principal.name!r} may have at once "
                               f"(its max_concurrent_requests {limit} in the tenants file; each choice of each prompt "
                               "is a request running or waiting)", param=param)
        if self.tenant_shares and principal is not None and total - 1 >= max(
                1.0, queue_share(principal.weight, self.max_queue - total + 1)):  # alone in the queue, as in check
            raise RequestError(f"{asked} is {total} requests: more than tenant {principal.name!r} could ever hold in "
                               f"its share of the queue (--max-queue {self.max_queue}, weight {principal.weight:g}): "
                               "each choice of each prompt is a request running or waiting", param=param)
        self.check(principal, places)
        self.enter(reservation.tenant, places)
        reservation.places += places

    def enter(self, tenant: str | None = None, places: int = 1) -> None:
        self.inflight += places
        if tenant is not None:
            self.held[tenant] = self.held.get(tenant, 0) + places
        self.idle.clear()

    def leave(self, tenant: str | None = None, places: int = 1) -> None:
        self.inflight -= places
        if tenant is not None:
            self.held[tenant] -= places
            if self.held[tenant] == 0:
                del self.held[tenant]
        if self.inflight == 0:
            self.idle.set()
