"""The Kafka error model: a few domain errors, one translation, one retry policy.

Driver errors (aiokafka's for consumers and admin, librdkafka's through confluent-kafka
for producers) never leave ``datapath.kafka``: every wrapper raises one of the classes
below, ``from`` the driver error. Whether to retry is decided in ONE place,
:func:`retrying`, and only for :class:`KafkaUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiokafka.errors as driver
import confluent_kafka as rdkafka
from prometheus_client import CollectorRegistry, Counter

# What the drivers raise that `translate` turns into our domain errors.
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    driver.KafkaError,
    driver.IllegalOperation,
    rdkafka.KafkaException,
    OSError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class KafkaError(Exception):
    """Base of every Kafka failure raised by ``datapath.kafka``."""


# What `retrying` looks at: ours, and the driver's before translation.
_RETRY_CANDIDATES: tuple[type[BaseException], ...] = (KafkaError, *DRIVER_ERRORS)


class KafkaUnavailable(KafkaError):
    """Transient: broker down or unreachable, timeout, leader or coordinator moving or loading.

    Retrying the same operation later may succeed.
    """


class KafkaFatal(KafkaError):
    """Retrying cannot help: authentication, configuration, a fenced producer, an invalid
    transaction state, a topic that should exist and does not. An operator must act."""


class UnknownTopic(KafkaFatal):
    """A topic that should exist does not (topics are never auto-created)."""


class ProducerFenced(KafkaFatal):
    """Another producer with the same transactional id took over (or the transaction timed
    out). This producer must be closed; a new one resumes from the committed state."""


class MessageTooLarge(KafkaError):
    """A record is larger than the producer's or the topic's limit. The record, not the
    cluster, is at fault: split it or raise ``max.message.bytes``."""


class TopicExists(KafkaError):
    """A topic exists with a configuration other than the one asked for."""


# Driver errors that the driver marks retriable but that mean a wrong setup here:
# topics are created explicitly, so a missing one is not going to appear by waiting.
_UNKNOWN_TOPIC = (driver.UnknownTopicOrPartitionError,)
_TOO_LARGE = (driver.MessageSizeTooLargeError, driver.RecordTooLargeError)
_FENCED = (
    driver.ProducerFenced,
    driver.InvalidProducerEpoch,
    driver.TransactionCoordinatorFenced,
)
# Transient although the driver does not flag them retriable.
_UNAVAILABLE = (
    driver.KafkaTimeoutError,
    driver.KafkaUnavailableError,
    driver.RequestTimedOutError,
    driver.BrokerNotAvailableError,
    driver.ReplicaNotAvailableError,
    driver.ConcurrentTransactions,
    driver.CoordinatorLoadInProgressError,
    driver.CoordinatorNotAvailableError,
    driver.NotCoordinatorError,
)


_RD = rdkafka.KafkaError
# What a call into confluent-kafka raises for the cluster or the producer: its
# KafkaException, and SystemError (after a fatal error, a fenced producer's, it runs a
# delivery callback with that error still set, and the callback's first call fails so).
RDKAFKA_ERRORS = (rdkafka.KafkaException, SystemError)
_RD_UNKNOWN_TOPIC = frozenset(
    {_RD._UNKNOWN_TOPIC, _RD.UNKNOWN_TOPIC_OR_PART, _RD._UNKNOWN_PARTITION}
)
_RD_TOO_LARGE = frozenset({_RD.MSG_SIZE_TOO_LARGE, _RD.RECORD_LIST_TOO_LARGE})
_RD_FENCED = frozenset(
    {
        _RD._FENCED,
        _RD.PRODUCER_FENCED,
        _RD.INVALID_PRODUCER_EPOCH,
        _RD.TRANSACTION_COORDINATOR_FENCED,
    }
)
# A record dropped by an abort or a fatal error (the session that held it ended): a
# consequence of another error, not the cluster's fault.
RD_PURGED = frozenset({_RD._PURGE_QUEUE, _RD._PURGE_INFLIGHT})
_RD_UNAVAILABLE = RD_PURGED | frozenset(
    {
        _RD._MSG_TIMED_OUT,
        _RD._TIMED_OUT,
        _RD._TRANSPORT,
        _RD._ALL_BROKERS_DOWN,
        _RD._RESOLVE,
        _RD.REQUEST_TIMED_OUT,
        _RD.CONCURRENT_TRANSACTIONS,
        _RD.COORDINATOR_LOAD_IN_PROGRESS,
        _RD.COORDINATOR_NOT_AVAILABLE,
        _RD.NOT_COORDINATOR,
        _RD.LEADER_NOT_AVAILABLE,
        _RD.NOT_LEADER_FOR_PARTITION,
        _RD.NOT_ENOUGH_REPLICAS,
    }
)


def _translate_rdkafka(error: rdkafka.KafkaError) -> KafkaError:
    code = error.code()
    detail = f"{error.name()}: {error.str()}"
    if code in _RD_UNKNOWN_TOPIC:
        return UnknownTopic(f"topic or partition does not exist ({detail})")
    if code in _RD_TOO_LARGE:
        return MessageTooLarge(detail)
    if code == _RD.TOPIC_ALREADY_EXISTS:
        return TopicExists(detail)
    if code in _RD_FENCED:
        return ProducerFenced(detail)
    if error.fatal():
        return KafkaFatal(detail)
    if code in _RD_UNAVAILABLE or error.retriable():
        return KafkaUnavailable(detail)
    return KafkaFatal(detail)


def translate(exc: BaseException) -> KafkaError:
    """The domain error for a driver (or socket) error. Already translated errors pass."""
    if isinstance(exc, KafkaError):
        return exc
    if isinstance(exc, rdkafka.KafkaException):
        cause = exc.args[0] if exc.args else None
        if isinstance(cause, rdkafka.KafkaError):
            return _translate_rdkafka(cause)
        return KafkaFatal(str(exc))
    if isinstance(exc, SystemError):  # see RDKAFKA_ERRORS
        return KafkaFatal(f"the Kafka driver failed: {exc}")
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, _UNKNOWN_TOPIC):
        return UnknownTopic(f"topic or partition does not exist ({detail})")
    if isinstance(exc, _TOO_LARGE):
        return MessageTooLarge(detail)
    if isinstance(exc, driver.TopicAlreadyExistsError):
        return TopicExists(detail)
    if isinstance(exc, _FENCED):
        return ProducerFenced(detail)
    if isinstance(exc, _UNAVAILABLE):
        return KafkaUnavailable(detail)
    if isinstance(exc, driver.KafkaError) and exc.retriable:
        return KafkaUnavailable(detail)
    if isinstance(exc, TimeoutError | ConnectionError):
        return KafkaUnavailable(detail)
    # Authentication, authorization, configuration, invalid transaction state, unknown
    # codes, illegal operations: nothing that waiting would fix.
    return KafkaFatal(detail)


class KafkaMetrics:
    """The Kafka plumbing's Prometheus metrics, on the registry a service owns."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.retries = Counter(
            "datamover_kafka_retries_total",
            "Kafka operations retried after a transient failure (broker down, timeout, "
            "leader or coordinator moving).",
            labelnames=("operation",),
            registry=registry,
        )

    def retries_of(self, operation: str) -> float:
        """The retries counted so far for ``operation`` (for status pages and tests)."""
        value = self.retries.labels(operation=operation)._value.get()
        return float(value)


def backoff_delay(base: float, attempt: int, maximum: float = 30.0) -> float:
    """The wait before retrying after failed attempt number `attempt` (1, 2, ...): `base`
    seconds, doubling with each attempt, never above `maximum` (nor below `base`). Any
    number of attempts: a VM that keeps failing for days must not overflow the wait."""
    return min(base * 2.0 ** min(max(attempt - 1, 0), 64), max(base, maximum))


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    attempts: int,
    backoff: float,
    metrics: KafkaMetrics,
    max_backoff: float = 30.0,
) -> T:
    """Run ``op`` up to ``attempts`` times, retrying only :class:`KafkaUnavailable`.

    The wait doubles from ``backoff`` seconds up to ``max_backoff``. Every retry is counted
    in ``datamover_kafka_retries_total{operation=what}`` (keep ``what`` a fixed operation
    name: it is a label). Fatal errors raise at once; after the last attempt the transient
    error raises. Errors other than Kafka's, sockets' and timeouts' are bugs and propagate
    untouched.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, not {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return await op()
        except _RETRY_CANDIDATES as exc:
            error = translate(exc)
            if not isinstance(error, KafkaUnavailable) or attempt == attempts:
                if error is exc:
                    raise
                raise error from exc
            metrics.retries.labels(operation=what).inc()
            delay = backoff_delay(backoff, attempt, max_backoff)
            log.warning(
                "%s failed (attempt %d of %d), retrying in %.1fs: %s",
                what,
                attempt,
                attempts,
                delay,
                error,
            )
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")
