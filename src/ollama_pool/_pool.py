"""The pool: instance choice, in-flight accounting, ejection and retries.

A request goes through four named steps, shared by the sync and async entry
points: choose an instance and reserve a slot on it (`_Plan.next_step`), send
(the caller's function), classify the outcome (`_failures.classify`), then retry
or return. Only the waiting and the sending differ between sync and async, so
the drivers stay a few lines each. Shared counters change under one
`threading.Lock`, and no I/O happens while it is held.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
import weakref
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ollama_pool._balancer import STRATEGIES, Balancer
from ollama_pool._errors import (
    AllAttemptsFailedError,
    ConfigError,
    IncompleteResponseError,
    NoInstanceError,
    OllamaPoolError,
    PoolClosedError,
    StreamInterruptedError,
)
from ollama_pool._failures import Failure, classify, describe
from ollama_pool._health import HealthMonitor
from ollama_pool._instance import Instance
from ollama_pool._retry import RetryBudget, backoff_delay
from ollama_pool._urls import normalize_model, redact_url, scrub_secret

logger = logging.getLogger("ollama_pool")

T = TypeVar("T")

InstanceSpec = str | Mapping[str, Any] | Instance

# Weight of the newest sample in the latency average used by `peak_ewma`.
_EWMA_WEIGHT = 0.3


@dataclass
class _Wait:
    """Wait before asking `_Plan.next_step` again.

    `seconds` is a backoff delay; with `for_slot` set, the wait ends early when a
    slot is released or an instance returns (the pool's `_version` changes).
    """

    seconds: float
    for_slot: bool = False
    version: int = 0


class _Attempt:
    """One reserved slot on one instance; released exactly once."""

    __slots__ = ("at_busy_limit", "instance", "released", "started")

    def __init__(self, instance: Instance, at_busy_limit: bool):
        self.instance = instance
        self.started = time.monotonic()
        self.released = False
        # The attempt took the last slot under the instance's busy limit, so its
        # success shows the limit may grow.
        self.at_busy_limit = at_busy_limit


class _Plan:
    """The retry state of one request: attempts so far and the current round.

    A round tries each instance that serves the model at most once, healthy ones
    only while any is left; `max_retries + 1` rounds bound the attempts on each
    instance. Between rounds the request waits with backoff.
    """

    def __init__(self, pool: OllamaPool, model: str | None):
        self.pool = pool
        self.model = normalize_model(model) if model else None
        self.attempts: list[tuple[str, BaseException]] = []
        self.descriptions: list[str] = []
        self.tried_in_round: set[int] = set()
        self.round = 1
        self.recorded = False
        # Set after a failure that the retry budget pays for (see `RetryBudget`).
        self.retry_needs_budget = False

    def fail(self, reason: str = "") -> AllAttemptsFailedError:
        return AllAttemptsFailedError(self.attempts, reason, self.descriptions)

    def next_step(self) -> _Attempt | _Wait:
        pool = self.pool
        with pool._lock:
            if pool._closed:
                raise PoolClosedError("the pool is closed; create a new one")
            now = time.monotonic()
            candidates = pool._candidates(self.model, now)
            if not candidates:
                raise self._no_instance()
            untried = [i for i in candidates if i.index not in self.tried_in_round]
            in_rotation = [i for i in untried if pool._in_rotation(i, now)]
            all_ejected = not any(pool._in_rotation(i, now) for i in candidates)
            if not in_rotation and untried and all_ejected:
                # Every instance for this model is ejected: rather than fail at
                # once, try the one whose last failure is oldest.
                in_rotation = [min(untried, key=lambda i: i.last_failure_at)]
            if not in_rotation:
                return self._end_round()
            with_capacity = [i for i in in_rotation if i.has_capacity()]
            if not with_capacity or not pool._has_total_capacity():
                return _Wait(seconds=1.0, for_slot=True, version=pool._version)
            if self.retry_needs_budget:
                if not pool._budget.try_spend(now):
                    return self._end_round("retry budget exhausted")
                self.retry_needs_budget = False
            if not self.recorded:
                pool._budget.record_request(now)
                self.recorded = True
            return pool._reserve_slot(pool._balancer.pick(with_capacity), self)

    def _no_instance(self) -> OllamaPoolError:
        """Build the error for a request that no instance may serve now."""
        urls = [i.url for i in self.pool.instances]
        if self.attempts and self.model is None:
            return self.fail()
        error = NoInstanceError(self.model, urls)
        if self.attempts:
            error.__cause__ = self.attempts[-1][1]
        return error

    def _end_round(self, reason: str = "") -> _Wait:
        """Start the next round after a backoff wait, or raise if none is left.

        `reason` is set when the round ends early because the retry budget is
        spent; the request then waits like after a failed round, so a short
        burst of failures costs latency rather than failed requests.
        """
        if self.round > self.pool.max_retries:
            raise self.fail(reason)
        self.round += 1
        self.tried_in_round.clear()
        delay = backoff_delay(
            self.round, self.pool.backoff_base, self.pool.backoff_max, self.pool._rng
        )
        logger.debug(
            "Round %d for model %s ended (%s); retrying in %.2f s",
            self.round - 1,
            self.model,
            reason or "every instance was tried",
            delay,
        )
        return _Wait(seconds=delay)


class OllamaPool:
    """A set of Ollama instances behind one load balancer, health monitor and
    retry policy, free of any LLM framework.

    Use `call` / `acall` for one request and `stream` / `astream` for a streamed
    one: each takes a function that sends the request to a given `Instance`.
    The health monitor starts with the first request and stops on `close()`,
    `aclose()` or at the end of a `with` / `async with` block.

    How the pool survives failing instances:

    - A failed attempt is retried on another instance; a stream is retried only
      while no chunk has reached the caller.
    - An instance that refuses connections or times out leaves the rotation at
      once; one that returns errors leaves after `eject_after_failures` failures
      in a row. Ejections grow longer while they repeat. When the ejection time
      has passed and a probe of GET /api/version succeeds, the instance returns
      on probation: one request at a time until one succeeds, because a server
      that stalls mid-answer still answers probes.
    - When every instance is ejected, requests go to the one that failed longest
      ago rather than failing at once.
    - A "server busy" answer (503, or 429) is overload, not failure: the instance
      stays in rotation but gets at most as many requests at once as it had
      accepted (its busy limit), and the limit grows by about one each time that
      many requests succeed at it.
    - An instance that answers 404 for a model gets no more requests for it until
      a probe finds it in GET /api/tags or `max_ejection_time` has passed.

    Args:
        instances: base URLs (`"http://127.0.0.1:11434"`), dicts with `base_url`,
            `model` and optionally `max_in_flight`, or `Instance` objects.
        model: model of the instances given without one. A request for a model
            that no instance is configured with may go to any instance until
            that instance answers 404 for it.
        strategy: `round_robin`, `random`, `least_active`, `power_of_two` or
            `peak_ewma` (least expected wait: latency average times requests in
            flight).
        health_check_interval: seconds between two probes of an instance; 0
            disables the monitor, and ejected instances then return once their
            ejection time has passed.
        max_retries: retry rounds after the first; each round tries each instance
            serving the model at most once, so an instance sees at most
            `max_retries + 1` attempts of one request.
        connect_timeout: seconds to open a connection.
        read_timeout: maximum seconds between two chunks of a response, so a long
            answer that keeps streaming never times out and a stalled server does.
        max_in_flight_per_instance: requests sent to one instance at once (match
            the server's OLLAMA_NUM_PARALLEL); None for no limit. Requests beyond
            the limit wait in the pool, not in the server.
        max_in_flight: requests in flight across the whole pool; None for no limit.
        eject_after_failures: error answers in a row that eject an instance.
        base_ejection_time: seconds of the first ejection; the n-th ejection in a
            row lasts n times as long, up to `max_ejection_time`. Defaults to
            `health_check_interval`, or 5 seconds without a monitor.
        max_ejection_time: cap of one ejection, in seconds.
        backoff_base, backoff_max: seconds of the first wait between retry rounds
            and the cap; each round doubles the wait, with jitter.
        retry_budget_ratio, retry_budget_min: retries after failures within 10
            seconds stay below `retry_budget_min + retry_budget_ratio * requests`;
            see `RetryBudget` for what happens when the budget is spent.
        probe_timeout: seconds a health probe may take.
        seed: seed of the random choices, for reproducible tests.
    """

    def __init__(
        self,
        instances: Iterable[InstanceSpec],
        *,
        model: str | None = None,
        strategy: str = "round_robin",
        health_check_interval: float = 30.0,
        max_retries: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        max_in_flight_per_instance: int | None = None,
        max_in_flight: int | None = None,
        eject_after_failures: int = 3,
        base_ejection_time: float | None = None,
        max_ejection_time: float = 300.0,
        backoff_base: float = 0.5,
        backoff_max: float = 10.0,
        retry_budget_ratio: float = 0.2,
        retry_budget_min: int = 10,
        probe_timeout: float = 5.0,
        seed: int | None = None,
    ):
        _check_options(locals())
        self.instances: tuple[Instance, ...] = _build_instances(
            instances, model, max_in_flight_per_instance
        )
        self.strategy = strategy
        self.health_check_interval = float(health_check_interval)
        self.max_retries = int(max_retries)
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self.max_in_flight = max_in_flight
        self.eject_after_failures = int(eject_after_failures)
        if base_ejection_time is None:
            base_ejection_time = self.health_check_interval or 5.0
        self.base_ejection_time = float(base_ejection_time)
        self.max_ejection_time = float(max_ejection_time)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.probe_timeout = float(probe_timeout)

        self._rng = random.Random(seed)
        self._balancer = Balancer(strategy, self._rng)
        self._budget = RetryBudget(retry_budget_ratio, retry_budget_min)
        self._lock = threading.Lock()
        self._slot_released = threading.Condition(self._lock)
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        # Changes whenever a slot is released or an instance returns to rotation.
        self._version = 0
        self._in_flight = 0
        self._closed = False
        self._monitor: HealthMonitor | None = None
        if self.health_check_interval > 0:
            self._monitor = HealthMonitor(
                self, self.health_check_interval, self.probe_timeout
            )
            # A pool dropped without close() stops its monitor thread.
            weakref.finalize(self, self._monitor.request_stop)

    # -- Entry points ---------------------------------------------------------

    def call(self, send: Callable[[Instance], T], *, model: str | None = None) -> T:
        """Run `send(instance)` on a chosen instance, retrying elsewhere on failure."""
        self._start_monitor()
        plan = _Plan(self, model)
        while True:
            attempt = self._reserve(plan)
            try:
                result = send(attempt.instance)
            except BaseException as exc:
                self._after_failure(plan, attempt, exc)
                continue
            self._after_success(attempt)
            return result

    async def acall(
        self, send: Callable[[Instance], Awaitable[T]], *, model: str | None = None
    ) -> T:
        """Await `send(instance)` on a chosen instance; retry elsewhere on failure."""
        self._start_monitor()
        plan = _Plan(self, model)
        while True:
            attempt = await self._areserve(plan)
            try:
                result = await send(attempt.instance)
            except BaseException as exc:
                self._after_failure(plan, attempt, exc)
                continue
            self._after_success(attempt)
            return result

    def stream(
        self,
        open_stream: Callable[[Instance], Iterator[T]],
        *,
        is_final: Callable[[T], bool],
        model: str | None = None,
    ) -> Iterator[T]:
        """Yield the items of `open_stream(instance)` from a chosen instance.

        Failures before the first item are retried elsewhere, so the caller sees
        one normal stream. A failure after items were yielded raises
        `StreamInterruptedError`, and so does a stream that ends before an item
        for which `is_final` is true: it never ends quietly as if complete.
        """
        self._start_monitor()
        plan = _Plan(self, model)
        while True:
            attempt = self._reserve(plan)
            try:
                iterator = open_stream(attempt.instance)
            except BaseException as exc:
                self._after_failure(plan, attempt, exc)
                continue
            try:
                first = next(iterator)
            except StopIteration:
                self._after_failure(plan, attempt, _empty_stream(attempt.instance))
                continue
            except BaseException as exc:
                try:
                    _close_quietly(iterator)
                finally:
                    self._after_failure(plan, attempt, exc)
                continue
            break
        yield from self._deliver(attempt, iterator, first, is_final)

    async def astream(
        self,
        open_stream: Callable[[Instance], AsyncIterator[T]],
        *,
        is_final: Callable[[T], bool],
        model: str | None = None,
    ) -> AsyncIterator[T]:
        """Async version of `stream`, with the same retry rules."""
        self._start_monitor()
        plan = _Plan(self, model)
        while True:
            attempt = await self._areserve(plan)
            try:
                iterator = open_stream(attempt.instance)
            except BaseException as exc:
                self._after_failure(plan, attempt, exc)
                continue
            try:
                first = await iterator.__anext__()
            except StopAsyncIteration:
                self._after_failure(plan, attempt, _empty_stream(attempt.instance))
                continue
            except BaseException as exc:
                # The slot is released even if closing is cancelled in turn.
                try:
                    await _aclose_quietly(iterator)
                finally:
                    self._after_failure(plan, attempt, exc)
                continue
            break
        chunks = 0
        done = False
        item = first
        try:
            while True:
                done = done or is_final(item)
                yield item
                chunks += 1
                try:
                    item = await iterator.__anext__()
                except StopAsyncIteration:
                    break
            if not done:
                raise _cut_stream(attempt.instance)
        except BaseException as exc:
            self._after_stream_error(attempt, exc, chunks)
        else:
            self._after_success(attempt)
        finally:
            self._release(attempt)
            await _aclose_quietly(iterator)

    # -- Lifecycle ------------------------------------------------------------

    def close(self) -> None:
        """Stop the health monitor; later requests raise `PoolClosedError`."""
        with self._lock:
            self._closed = True
            self._version += 1
            self._slot_released.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        _wake_async_waiters(waiters)
        if self._monitor is not None:
            self._monitor.stop()

    async def aclose(self) -> None:
        """Close the pool without blocking the event loop."""
        await asyncio.to_thread(self.close)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> OllamaPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> OllamaPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- Introspection ---------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def healthy_instances(self) -> list[Instance]:
        with self._lock:
            return [i for i in self.instances if i.healthy]

    @property
    def monitor_running(self) -> bool:
        return self._monitor is not None and self._monitor.running

    def stats(self) -> list[dict[str, object]]:
        """Return the counters of each instance, in pool order."""
        with self._lock:
            return [instance.snapshot() for instance in self.instances]

    def __repr__(self) -> str:
        with self._lock:
            parts = [
                f"{i.url} {'healthy' if i.healthy else 'ejected'} "
                f"in_flight={i.in_flight} failures={i.failures}"
                for i in self.instances
            ]
        state = "closed" if self._closed else self.strategy
        return f"<OllamaPool {state} [{'; '.join(parts)}]>"

    # -- Slot reservation --------------------------------------------------------

    def _reserve(self, plan: _Plan) -> _Attempt:
        while True:
            step = plan.next_step()
            if isinstance(step, _Attempt):
                return step
            if not step.for_slot:
                time.sleep(step.seconds)
                continue
            with self._lock:
                if self._version == step.version and not self._closed:
                    self._slot_released.wait(timeout=step.seconds)

    async def _areserve(self, plan: _Plan) -> _Attempt:
        while True:
            step = plan.next_step()
            if isinstance(step, _Attempt):
                return step
            if not step.for_slot:
                await asyncio.sleep(step.seconds)
                continue
            loop = asyncio.get_running_loop()
            future: asyncio.Future[None] = loop.create_future()
            with self._lock:
                if self._version != step.version or self._closed:
                    continue
                self._async_waiters.append((loop, future))
            # asyncio.wait, unlike wait_for before Python 3.12, never loses a
            # cancellation that arrives together with the wake-up.
            try:
                await asyncio.wait((future,), timeout=step.seconds)
            finally:
                with self._lock:
                    if (loop, future) in self._async_waiters:
                        self._async_waiters.remove((loop, future))

    def _reserve_slot(self, instance: Instance, plan: _Plan) -> _Attempt:
        """Count a new attempt on `instance`; the caller holds the lock."""
        instance.in_flight += 1
        instance.requests += 1
        self._in_flight += 1
        plan.tried_in_round.add(instance.index)
        busy_limit = instance.busy_limit
        at_busy_limit = busy_limit is not None and instance.in_flight >= max(
            1, math.floor(busy_limit)
        )
        return _Attempt(instance, at_busy_limit)

    def _release(self, attempt: _Attempt) -> None:
        with self._lock:
            if attempt.released:
                return
            attempt.released = True
            attempt.instance.in_flight -= 1
            self._in_flight -= 1
            waiters = self._slots_changed()
        _wake_async_waiters(waiters)

    def _slots_changed(self) -> list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]:
        """Wake the threads waiting for a slot; return the async waiters to wake.

        The caller holds the lock and wakes the returned waiters after releasing
        it, with `_wake_async_waiters`.
        """
        self._version += 1
        self._slot_released.notify_all()
        waiters, self._async_waiters = self._async_waiters, []
        return waiters

    def _has_total_capacity(self) -> bool:
        return self.max_in_flight is None or self._in_flight < self.max_in_flight

    def _candidates(self, model: str | None, now: float) -> list[Instance]:
        """Return the instances a request for `model` may go to.

        The caller holds the lock.
        """
        if model is not None and all(i.model != model for i in self.instances):
            # No instance is configured with this model (an embedding model next
            # to chat models, say), but any of them may have it pulled: try those
            # that have not answered 404 for it.
            return [i for i in self.instances if not i.lacks(model, now)]
        return [i for i in self.instances if i.serves(model, now)]

    # -- Outcomes -----------------------------------------------------------------

    def _after_success(self, attempt: _Attempt) -> None:
        instance = attempt.instance
        elapsed = time.monotonic() - attempt.started
        self._release(attempt)
        with self._lock:
            instance.successes += 1
            instance.consecutive_failures = 0
            if instance.latency_ewma is None:
                instance.latency_ewma = elapsed
            else:
                instance.latency_ewma += _EWMA_WEIGHT * (
                    elapsed - instance.latency_ewma
                )
            grew = attempt.at_busy_limit and self._grow_busy_limit(instance)
            # Case 1: a request sent while the instance was ejected (every
            # instance was) succeeded, so it serves again. A request sent before
            # the ejection does not cut the ejection short.
            returned = not instance.healthy and attempt.started >= instance.ejected_at
            # Case 2: the trial request of a returned instance succeeded.
            trial_passed = (
                instance.healthy
                and instance.on_probation
                and attempt.started >= instance.ejected_at
            )
            waiters = []
            if returned:
                self._return_to_rotation(instance, probation=False)
            if trial_passed:
                instance.on_probation = False
            if returned or trial_passed or grew:
                waiters = self._slots_changed()
        _wake_async_waiters(waiters)
        if returned:
            logger.info(
                "Instance %s is back in rotation: a request succeeded", instance.url
            )
        elif trial_passed:
            logger.info(
                "Instance %s passed its trial request and takes full load again",
                instance.url,
            )

    def _after_failure(
        self, plan: _Plan, attempt: _Attempt, exc: BaseException
    ) -> None:
        """Record a failed attempt; re-raise `exc` unless another attempt may fix it."""
        kind = classify(exc)
        if kind in (Failure.CLIENT, Failure.NOT_OURS):
            self._release(attempt)
            raise exc
        instance = attempt.instance
        reason = scrub_secret(describe(exc), instance.base_url)
        plan.attempts.append((instance.url, exc))
        plan.descriptions.append(reason)
        if kind is Failure.BUSY and self._lower_busy_limit(attempt, reason):
            return
        self._release(attempt)
        if kind is Failure.MODEL_MISSING and plan.model is not None:
            self._mark_model_missing(instance, plan.model, reason)
            return
        plan.retry_needs_budget = True
        self._record_failure(
            instance,
            reason,
            at_once=kind is Failure.UNRESPONSIVE,
            started=attempt.started,
        )

    def _after_stream_error(
        self, attempt: _Attempt, exc: BaseException, chunks: int
    ) -> None:
        """Handle an error after chunks reached the caller; always raises."""
        kind = classify(exc)
        if isinstance(exc, GeneratorExit) or kind in (Failure.CLIENT, Failure.NOT_OURS):
            raise exc
        instance = attempt.instance
        reason = scrub_secret(describe(exc), instance.base_url)
        self._release(attempt)
        self._record_failure(
            instance,
            reason,
            at_once=kind is Failure.UNRESPONSIVE,
            started=attempt.started,
        )
        raise StreamInterruptedError(instance.url, exc, chunks) from exc

    def _deliver(
        self,
        attempt: _Attempt,
        iterator: Iterator[T],
        first: T,
        is_final: Callable[[T], bool],
    ) -> Iterator[T]:
        chunks = 0
        done = False
        item = first
        try:
            while True:
                done = done or is_final(item)
                yield item
                chunks += 1
                try:
                    item = next(iterator)
                except StopIteration:
                    break
            if not done:
                raise _cut_stream(attempt.instance)
        except BaseException as exc:
            self._after_stream_error(attempt, exc, chunks)
        else:
            self._after_success(attempt)
        finally:
            self._release(attempt)
            _close_quietly(iterator)

    # -- Busy limit -----------------------------------------------------------------

    def _lower_busy_limit(self, attempt: _Attempt, reason: str) -> bool:
        """Cap an instance that answered "busy" at what it accepted; release the slot.

        Returns False, leaving the slot reserved, when the pool had no other
        request on the instance: it cannot be overloaded by this pool, so the
        answer counts as an ordinary failure.
        """
        instance = attempt.instance
        with self._lock:
            # The requests that the server kept while it rejected this one.
            accepted = instance.in_flight - 1
            if accepted < 1:
                return False
            current = instance.busy_limit
            if current is None or accepted < current:
                instance.busy_limit = float(accepted)
            limit = min(accepted, math.floor(current or accepted))
        self._release(attempt)
        log = logger.info if current is None else logger.debug
        log(
            "Instance %s is busy; it gets at most %d requests at once for now: %s",
            instance.url,
            limit,
            reason,
        )
        return True

    def _grow_busy_limit(self, instance: Instance) -> bool:
        """Raise the busy limit by 1/limit: about one per `limit` successes.

        The caller holds the lock. Reaching the configured limit drops the busy
        limit altogether. Returns whether a slot was added.
        """
        limit = instance.busy_limit
        if limit is None:
            return False
        grown = limit + 1.0 / limit
        if instance.max_in_flight is not None and grown >= instance.max_in_flight:
            instance.busy_limit = None
            return True
        instance.busy_limit = grown
        return math.floor(grown) > math.floor(limit)

    # -- Health state ---------------------------------------------------------------

    def _in_rotation(self, instance: Instance, now: float) -> bool:
        """Tell whether new requests may go to `instance`; the caller holds the lock."""
        if instance.healthy:
            return True
        if self.monitor_running or now < instance.ejected_until:
            return False
        # Without a monitor, an ejection simply expires.
        self._return_to_rotation(instance, probation=True)
        logger.info(
            "Instance %s is back in rotation on probation: its ejection expired",
            instance.url,
        )
        return True

    def _record_failure(
        self, instance: Instance, reason: str, *, at_once: bool, started: float
    ) -> None:
        """Count a failed attempt and eject the instance if it is due.

        `at_once` ejects on this failure alone; so does any failure of a trial
        request. An attempt sent before the current ejection began changes
        nothing but the counters, since the ejection already covers it.
        """
        now = time.monotonic()
        with self._lock:
            instance.failures += 1
            instance.last_failure_reason = reason
            stale = not instance.healthy and started < instance.ejected_at
            if not stale:
                instance.consecutive_failures += 1
                instance.last_failure_at = now
            eject = instance.healthy and (
                at_once
                or instance.on_probation
                or instance.consecutive_failures >= self.eject_after_failures
            )
            if eject:
                duration = self._eject(instance, now)
        if eject:
            logger.warning(
                "Instance %s left the rotation for %.1f s: %s",
                instance.url,
                duration,
                reason,
            )
            if self._monitor is not None:
                self._monitor.wake()
        else:
            logger.debug("Attempt on %s failed: %s", instance.url, reason)

    def _eject(self, instance: Instance, now: float) -> float:
        # An instance that stayed healthy for a whole maximum ejection time starts
        # counting its ejections again from zero.
        if now - instance.healthy_since > self.max_ejection_time:
            instance.ejections = 0
        instance.ejections += 1
        duration = min(
            self.base_ejection_time * instance.ejections, self.max_ejection_time
        )
        instance.healthy = False
        instance.on_probation = False
        instance.ejected_at = now
        instance.ejected_until = now + duration
        instance.next_probe_at = instance.ejected_until
        return duration

    def _return_to_rotation(self, instance: Instance, *, probation: bool) -> None:
        """Put `instance` back in rotation; the caller holds the lock and wakes
        the waiters."""
        instance.healthy = True
        instance.on_probation = probation
        instance.consecutive_failures = 0
        instance.healthy_since = time.monotonic()

    def _mark_model_missing(self, instance: Instance, model: str, reason: str) -> None:
        with self._lock:
            instance.missing_models[model] = time.monotonic() + self.max_ejection_time
        logger.warning(
            "Instance %s does not serve model %s; no requests for it go there "
            "until the model is listed in /api/tags: %s",
            instance.url,
            model,
            reason,
        )
        if self._monitor is not None:
            self._monitor.wake()

    def _record_models(self, instance: Instance, listed: Iterable[str]) -> None:
        """Drop the 404 marks of the models that /api/tags of `instance` lists."""
        names = {normalize_model(name) for name in listed}
        with self._lock:
            found = sorted(set(instance.missing_models) & names)
            for model in found:
                del instance.missing_models[model]
        for model in found:
            logger.info(
                "Instance %s lists model %s again; requests for it go there",
                instance.url,
                model,
            )

    def _record_probe(self, instance: Instance, reason: str) -> None:
        """Apply one probe result: `reason` is empty when the probe succeeded."""
        now = time.monotonic()
        waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        returned = ejected = False
        with self._lock:
            if not reason:
                returned = not instance.healthy and now >= instance.ejected_until
                if returned:
                    self._return_to_rotation(instance, probation=True)
                    waiters = self._slots_changed()
                elif instance.healthy:
                    instance.consecutive_failures = 0
            else:
                ejected = instance.healthy
                instance.last_failure_at = now
                instance.last_failure_reason = reason
                if ejected:
                    duration = self._eject(instance, now)
        _wake_async_waiters(waiters)
        if returned:
            logger.info(
                "Instance %s is back in rotation on probation: a probe succeeded",
                instance.url,
            )
        elif ejected:
            logger.warning(
                "Instance %s left the rotation for %.1f s: %s",
                instance.url,
                duration,
                reason,
            )

    def _start_monitor(self) -> None:
        if self._closed:
            raise PoolClosedError("the pool is closed; create a new one")
        monitor = self._monitor
        if monitor is not None and not monitor.running:
            with self._lock:
                if self._closed:
                    return
            monitor.start()


def _empty_stream(instance: Instance) -> IncompleteResponseError:
    return IncompleteResponseError(f"{instance.url} ended the stream before any chunk")


def _cut_stream(instance: Instance) -> IncompleteResponseError:
    return IncompleteResponseError(
        f"{instance.url} ended the stream without its final chunk (done: true)"
    )


def _close_quietly(iterator: Iterator[Any]) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # Closing a broken stream must not hide its error.
            logger.debug("Closing a stream failed", exc_info=True)


async def _aclose_quietly(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # Closing a broken stream must not hide its error.
            logger.debug("Closing a stream failed", exc_info=True)


def _wake_async_waiters(
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]],
) -> None:
    for loop, future in waiters:
        if loop.is_closed():
            continue
        try:
            loop.call_soon_threadsafe(_resolve, future)
        except RuntimeError:  # The loop closed in between.
            continue


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _build_instances(
    specs: Iterable[InstanceSpec], model: str | None, max_in_flight: int | None
) -> tuple[Instance, ...]:
    if isinstance(specs, (str, Mapping)):
        raise ConfigError(
            "expected a list of instances, not a single one", key="instances"
        )
    instances = []
    for index, spec in enumerate(specs):
        key = f"instances[{index}]"
        if isinstance(spec, Instance):
            spec.index = index
            if spec.max_in_flight is None:
                spec.max_in_flight = max_in_flight
            instances.append(spec)
            continue
        if isinstance(spec, str):
            spec = {"base_url": spec}
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"expected a URL string or a mapping, got {type(spec).__name__}",
                key=key,
            )
        unknown = set(spec) - {"base_url", "model", "max_in_flight"}
        if unknown:
            raise ConfigError(f"unknown keys {sorted(unknown, key=str)}", key=key)
        base_url = _check_url(spec.get("base_url"), f"{key}.base_url")
        limit = spec.get("max_in_flight", max_in_flight)
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ConfigError(
                f"must be a positive integer, got {limit!r}", key=f"{key}.max_in_flight"
            )
        instances.append(
            Instance(
                base_url, spec.get("model") or model, max_in_flight=limit, index=index
            )
        )
    if not instances:
        raise ConfigError(
            "the instance list is empty; give at least one base_url", key="instances"
        )
    return tuple(instances)


def _check_url(url: object, key: str) -> str:
    """Return `url` if it is an http(s) URL with a host; raise ConfigError if not."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"missing or not a string: {url!r}", key=key)
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        _ = parts.port  # Raises ValueError for a port that is not a number.
    except ValueError as exc:
        raise ConfigError(f"malformed URL {shown!r}: {exc}", key=key) from exc
    has_space = any(character.isspace() for character in url)
    if parts.scheme not in ("http", "https") or not parts.hostname or has_space:
        raise ConfigError(
            f"malformed URL {shown!r}: expected http://HOST:PORT, "
            f"for example http://127.0.0.1:11434",
            key=key,
        )
    return url


def _check_options(options: dict[str, Any]) -> None:
    if options["strategy"] not in STRATEGIES:
        raise ConfigError(
            f"unknown strategy {options['strategy']!r}; choose one of "
            f"{', '.join(STRATEGIES)}",
            key="strategy",
        )
    non_negative = (
        "health_check_interval",
        "max_retries",
        "backoff_base",
        "backoff_max",
        "retry_budget_ratio",
        "retry_budget_min",
    )
    for name in non_negative:
        value = options[name]
        if not _is_finite_number(value) or value < 0:
            raise ConfigError(f"must be a finite number >= 0, got {value!r}", key=name)
    positive = ("connect_timeout", "read_timeout", "max_ejection_time", "probe_timeout")
    for name in positive:
        value = options[name]
        if not _is_finite_number(value) or value <= 0:
            raise ConfigError(f"must be a finite number > 0, got {value!r}", key=name)
    for name in ("max_in_flight_per_instance", "max_in_flight", "eject_after_failures"):
        value = options[name]
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"must be a positive integer, got {value!r}", key=name)
    base = options["base_ejection_time"]
    if base is not None and (not _is_finite_number(base) or base <= 0):
        raise ConfigError(
            f"must be a finite number > 0, got {base!r}", key="base_ejection_time"
        )


def _is_finite_number(value: object) -> bool:
    """Tell whether `value` is an int or float other than bool, NaN or infinity.

    NaN passes every `<` check, and httpx rejects NaN and infinite timeouts only
    when the first request is sent.
    """
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )
