"""The Kafka plumbing's contracts: topic names and configs, the error model, retries,
settings that keep secrets, and the wrappers against a real broker."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
from typing import Any

import aiokafka.errors as driver
import confluent_kafka as rdkafka
import pytest
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry
from pydantic import SecretStr, ValidationError
from replication_helpers import read_topic

from datapath.kafka import (
    MAX_UNACKED_RECORDS,
    Admin,
    Consumer,
    KafkaClusterSettings,
    KafkaError,
    KafkaFatal,
    KafkaMetrics,
    KafkaUnavailable,
    MessageTooLarge,
    Producer,
    ProducerFenced,
    TopicExists,
    TransactionalProducer,
    UnknownTopic,
    backoff_delay,
    retrying,
    translate,
)
from datapath.topics import (
    MAX_TOPIC_NAME_LENGTH,
    MAX_VM_ID_LENGTH,
    VM_STREAMS,
    Stream,
    TopicSpec,
    site_topic_specs,
    topic_name,
    vm_topic_specs,
)

KiB = 1024
MiB = 1024 * KiB
DAY_MS = 24 * 3600 * 1000


# --- topics -------------------------------------------------------------------------------


def test_topic_names_come_from_one_scheme() -> None:
    assert topic_name(Stream.TAP, "vm-1") == "dm.tap.vm-1"
    assert topic_name(Stream.BATCH, "VM_2") == "dm.batch.VM_2"
    assert topic_name(Stream.CONTROL) == "dm.control"
    names = {topic_name(stream, "x") for stream in VM_STREAMS}
    assert len(names) == len(VM_STREAMS)
    longest = topic_name(Stream.DEADLETTER, "a" * MAX_VM_ID_LENGTH)
    assert len(longest) <= MAX_TOPIC_NAME_LENGTH


@pytest.mark.parametrize(
    ("stream", "vm_id"),
    [
        (Stream.TAP, ""),
        (Stream.TAP, "a.b"),  # '.' would collide with '_' in Kafka's metric names
        (Stream.TAP, "a/b"),
        (Stream.TAP, "vm 1"),
        (Stream.TAP, "vmé"),
        (Stream.TAP, "a" * (MAX_VM_ID_LENGTH + 1)),
        (Stream.TAP, None),
        (Stream.CONTROL, "vm-1"),
    ],
)
def test_illegal_topic_names_are_refused(stream: Stream, vm_id: str | None) -> None:
    with pytest.raises(ValueError):
        topic_name(stream, vm_id)


def test_vm_topics_have_explicit_configs() -> None:
    specs = {
        spec.name: spec
        for spec in vm_topic_specs(
            "vm-7", replication_factor=3, retention_ms=DAY_MS, max_message_bytes=4 * MiB
        )
    }
    assert set(specs) == {topic_name(stream, "vm-7") for stream in VM_STREAMS}
    for spec in specs.values():
        assert (spec.partitions, spec.replication_factor) == (1, 3)
        assert spec.configs["min.insync.replicas"] == "2"
        assert spec.configs["unclean.leader.election.enable"] == "false"
    for stream in (Stream.TAP, Stream.BATCH):
        configs = specs[topic_name(stream, "vm-7")].configs
        assert configs["cleanup.policy"] == "delete"
        assert configs["retention.ms"] == str(DAY_MS)
        assert configs["max.message.bytes"] == str(4 * MiB)
    deadletter = specs[topic_name(Stream.DEADLETTER, "vm-7")].configs
    assert int(deadletter["retention.ms"]) >= 7 * DAY_MS
    assert specs[topic_name(Stream.OFFSETS, "vm-7")].configs["cleanup.policy"] == "compact"
    for spec in site_topic_specs(replication_factor=1):
        assert spec.configs["cleanup.policy"] == "compact"
        assert spec.configs["min.insync.replicas"] == "1"


def test_topic_configs_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValueError):
        vm_topic_specs("v", replication_factor=0, retention_ms=DAY_MS, max_message_bytes=MiB)
    with pytest.raises(ValueError):
        vm_topic_specs(
            "v",
            replication_factor=1,
            retention_ms=DAY_MS,
            max_message_bytes=MiB,
            min_insync_replicas=2,
        )
    with pytest.raises(ValueError):
        vm_topic_specs("v", replication_factor=1, retention_ms=0, max_message_bytes=MiB)


# --- the error model ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (driver.KafkaConnectionError("refused"), KafkaUnavailable),
        (driver.NoBrokersAvailable(), KafkaUnavailable),
        (driver.KafkaTimeoutError(), KafkaUnavailable),
        (driver.RequestTimedOutError(), KafkaUnavailable),
        (driver.NotLeaderForPartitionError(), KafkaUnavailable),
        (driver.LeaderNotAvailableError(), KafkaUnavailable),
        (driver.GroupCoordinatorNotAvailableError(), KafkaUnavailable),
        (driver.GroupLoadInProgressError(), KafkaUnavailable),
        (driver.NotEnoughReplicasError(), KafkaUnavailable),
        (driver.ConcurrentTransactions(), KafkaUnavailable),
        (ConnectionRefusedError(), KafkaUnavailable),
        (TimeoutError(), KafkaUnavailable),
        (driver.SaslAuthenticationFailed(), KafkaFatal),
        (driver.AuthenticationFailedError(), KafkaFatal),
        (driver.TopicAuthorizationFailedError(), KafkaFatal),
        (driver.InvalidTxnState(), KafkaFatal),
        (driver.InvalidConfigurationError(), KafkaFatal),
        (driver.IllegalOperation("no transaction"), KafkaFatal),
        (driver.UnknownTopicOrPartitionError(), UnknownTopic),
        (driver.ProducerFenced(), ProducerFenced),
        (driver.InvalidProducerEpoch(), ProducerFenced),
        (driver.MessageSizeTooLargeError(), MessageTooLarge),
        (driver.RecordTooLargeError(), MessageTooLarge),
        (driver.TopicAlreadyExistsError(), TopicExists),
    ],
)
def test_driver_errors_translate_to_domain_errors(
    raised: BaseException, expected: type[KafkaError]
) -> None:
    translated = translate(raised)
    assert type(translated) is expected
    assert type(raised).__name__ in str(translated)


_RD = rdkafka.KafkaError


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_RD(_RD._MSG_TIMED_OUT), KafkaUnavailable),
        (_RD(_RD._TRANSPORT), KafkaUnavailable),
        (_RD(_RD._ALL_BROKERS_DOWN), KafkaUnavailable),
        (_RD(_RD._PURGE_QUEUE), KafkaUnavailable),
        (_RD(_RD.NOT_ENOUGH_REPLICAS), KafkaUnavailable),
        (_RD(_RD.CONCURRENT_TRANSACTIONS), KafkaUnavailable),
        (_RD(_RD.REQUEST_TIMED_OUT), KafkaUnavailable),
        (_RD(_RD._UNKNOWN_TOPIC), UnknownTopic),
        (_RD(_RD.UNKNOWN_TOPIC_OR_PART), UnknownTopic),
        (_RD(_RD.MSG_SIZE_TOO_LARGE), MessageTooLarge),
        (_RD(_RD._FENCED, fatal=True), ProducerFenced),
        (_RD(_RD.PRODUCER_FENCED), ProducerFenced),
        (_RD(_RD.INVALID_PRODUCER_EPOCH), ProducerFenced),
        (_RD(_RD.TOPIC_ALREADY_EXISTS), TopicExists),
        (_RD(_RD.SASL_AUTHENTICATION_FAILED), KafkaFatal),
        (_RD(_RD.TOPIC_AUTHORIZATION_FAILED), KafkaFatal),
        (_RD(_RD.INVALID_TXN_STATE), KafkaFatal),
        # Fatal wins over a code that would otherwise be worth a retry.
        (_RD(_RD._TIMED_OUT, fatal=True), KafkaFatal),
        (_RD(_RD.UNKNOWN, retriable=True), KafkaUnavailable),
    ],
)
def test_librdkafka_errors_translate_to_the_same_domain_errors(
    error: rdkafka.KafkaError, expected: type[KafkaError]
) -> None:
    translated = translate(rdkafka.KafkaException(error))
    assert type(translated) is expected
    assert error.name() in str(translated)


def test_unknown_topic_and_fencing_are_fatal_and_domain_errors_pass_through() -> None:
    assert issubclass(UnknownTopic, KafkaFatal)
    assert issubclass(ProducerFenced, KafkaFatal)
    assert not issubclass(MessageTooLarge, KafkaUnavailable | KafkaFatal)
    already = KafkaUnavailable("down")
    assert translate(already) is already
    # confluent-kafka's SystemError after a fatal error (a fenced producer's callback).
    broken = translate(SystemError("<class 'contextlib.suppress'> returned a result"))
    assert type(broken) is KafkaFatal and "driver failed" in str(broken)


async def test_retrying_retries_only_transient_errors_and_counts_every_retry() -> None:
    metrics = KafkaMetrics(CollectorRegistry())
    calls: list[str] = []

    async def flaky() -> str:
        calls.append("flaky")
        if len(calls) < 3:
            raise driver.NotLeaderForPartitionError()
        return "done"

    assert await retrying(flaky, what="produce", attempts=5, backoff=0.001, metrics=metrics) == (
        "done"
    )
    assert len(calls) == 3
    assert metrics.retries_of("produce") == 2

    async def fenced() -> None:
        calls.append("fenced")
        raise driver.ProducerFenced()

    with pytest.raises(ProducerFenced) as failure:
        await retrying(fenced, what="commit", attempts=5, backoff=0.001, metrics=metrics)
    assert calls.count("fenced") == 1
    assert metrics.retries_of("commit") == 0
    assert isinstance(failure.value.__cause__, driver.ProducerFenced)

    async def bug() -> None:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await retrying(bug, what="bug", attempts=5, backoff=0.001, metrics=metrics)


async def test_retrying_gives_up_on_an_unreachable_cluster_after_counting_its_retries() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    cluster = KafkaClusterSettings(bootstrap_servers=f"127.0.0.1:{closed_port}")
    metrics = KafkaMetrics(CollectorRegistry())

    async def list_topics() -> set[str]:
        async with Admin(cluster, request_timeout_ms=2000) as admin:
            return await admin.list_topics()

    with pytest.raises(KafkaUnavailable) as failure:
        await retrying(list_topics, what="list_topics", attempts=3, backoff=0.01, metrics=metrics)
    assert metrics.retries_of("list_topics") == 2
    assert isinstance(failure.value.__cause__, driver.KafkaConnectionError)


def test_the_retry_wait_doubles_up_to_its_bound_for_any_number_of_attempts() -> None:
    assert [backoff_delay(0.5, attempt) for attempt in range(1, 8)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
    ]
    # A VM that fails to open for days: thousands of attempts, still the bound.
    assert backoff_delay(0.5, 100_000) == 30.0
    assert backoff_delay(0.001, 100_000, maximum=2.0) == 2.0
    # A base above the bound is not cut down to it.
    assert backoff_delay(60.0, 3) == 60.0


# --- settings -----------------------------------------------------------------------------


def test_cluster_settings_never_show_their_secrets() -> None:
    settings = KafkaClusterSettings(
        bootstrap_servers="k1:9092, k2:9092",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="replicator",
        sasl_password=SecretStr("hunter2-secret"),
    )
    for shown in (repr(settings), str(settings), settings.model_dump_json(), settings.describe()):
        assert "hunter2-secret" not in shown
    kwargs = settings.client_kwargs()
    assert kwargs["bootstrap_servers"] == "k1:9092,k2:9092"
    assert kwargs["sasl_plain_password"] == "hunter2-secret"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["ssl_context"] is not None
    plain = KafkaClusterSettings(bootstrap_servers="127.0.0.1:9092").client_kwargs()
    assert plain["ssl_context"] is None and "sasl_plain_password" not in plain
    config = settings.rdkafka_config()
    assert config["bootstrap.servers"] == "k1:9092,k2:9092"
    assert config["security.protocol"] == "sasl_ssl"
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert config["sasl.username"] == "replicator"
    assert config["sasl.password"] == "hunter2-secret"
    assert config["ssl.endpoint.identification.algorithm"] == "https"
    plain_config = KafkaClusterSettings(bootstrap_servers="127.0.0.1:9092").rdkafka_config()
    assert plain_config["security.protocol"] == "plaintext"
    assert not any(key.startswith(("sasl.", "ssl.")) for key in plain_config)


@pytest.mark.parametrize(
    "fields",
    [
        {"bootstrap_servers": ""},
        {"bootstrap_servers": "no-port"},
        {"bootstrap_servers": "k:9092", "security_protocol": "SASL_PLAINTEXT"},
        {"bootstrap_servers": "k:9092", "sasl_mechanism": "PLAIN"},
        {"bootstrap_servers": "k:9092", "security_protocol": "SSL", "ssl_certfile": "/c.pem"},
        {"bootstrap_servers": "k:9092", "security_protocol": "TLS"},
    ],
)
def test_incomplete_cluster_settings_are_refused(fields: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        KafkaClusterSettings.model_validate(fields)


# --- against a real broker ----------------------------------------------------------------


def one_topic(vm_id: str, *, max_message_bytes: int = 8 * MiB) -> TopicSpec:
    (spec,) = [
        spec
        for spec in vm_topic_specs(
            vm_id, replication_factor=1, retention_ms=DAY_MS, max_message_bytes=max_message_bytes
        )
        if spec.name == topic_name(Stream.BATCH, vm_id)
    ]
    return spec


async def created_topic(
    cluster: KafkaClusterSettings, vm_id: str, *, max_message_bytes: int = 8 * MiB
) -> TopicSpec:
    """`one_topic`, created on `cluster`."""
    spec = one_topic(vm_id, max_message_bytes=max_message_bytes)
    async with Admin(cluster) as admin:
        await admin.create_topics([spec])
    return spec


async def test_create_topics_is_idempotent_and_refuses_a_different_config(
    source_cluster: KafkaClusterSettings, vm_id: str
) -> None:
    specs = vm_topic_specs(vm_id, replication_factor=1, retention_ms=DAY_MS, max_message_bytes=MiB)
    names = [spec.name for spec in specs]
    async with Admin(source_cluster) as admin:
        assert sorted(await admin.create_topics(specs)) == sorted(names)
        assert await admin.create_topics(specs) == []
        described = await admin.describe_topics(names)
        for spec in specs:
            assert described[spec.name].partitions == 1
            assert described[spec.name].replication_factor == 1
            for key, value in spec.configs.items():
                assert described[spec.name].configs[key] == value

        changed = vm_topic_specs(
            vm_id, replication_factor=1, retention_ms=2 * DAY_MS, max_message_bytes=MiB
        )
        with pytest.raises(TopicExists, match=r"retention\.ms"):
            await admin.create_topics(changed)

        await admin.delete_topics(names)
        # Deletion is asynchronous in the broker: metadata may list a topic a moment longer.
        for _ in range(100):
            if not set(names) & await admin.list_topics():
                break
            await asyncio.sleep(0.1)
        assert not set(names) & await admin.list_topics()
        await admin.delete_topics(names)  # already gone: fine
        with pytest.raises(UnknownTopic):
            await admin.describe_topics(names[:1])


async def test_producing_to_a_missing_topic_is_fatal(source_cluster: KafkaClusterSettings) -> None:
    missing = topic_name(Stream.TAP, "never-created")
    async with Producer(source_cluster, request_timeout_ms=1500) as producer:
        with pytest.raises(UnknownTopic):
            await producer.send_and_wait(missing, b"lost?")
    async with Admin(source_cluster) as admin:
        assert missing not in await admin.list_topics()  # auto-create is off


async def test_oversized_records_raise_message_too_large(
    source_cluster: KafkaClusterSettings, vm_id: str
) -> None:
    spec = await created_topic(source_cluster, vm_id, max_message_bytes=64 * KiB)
    async with Producer(source_cluster, max_request_size=MiB) as producer:
        # Refused by the broker: larger than the topic's max.message.bytes.
        with pytest.raises(MessageTooLarge):
            await producer.send_and_wait(spec.name, b"x" * (200 * KiB))
        # Refused by the producer: larger than its max_request_size.
        with pytest.raises(MessageTooLarge):
            await producer.send(spec.name, b"x" * (2 * MiB))
        # The producer is still good for records that fit.
        metadata = await producer.send_and_wait(spec.name, b"fits")
    async with Consumer(source_cluster) as consumer:
        tp = TopicPartition(spec.name, 0)
        consumer.assign([tp])
        consumer.seek(tp, metadata.offset)
        fetched = await consumer.getmany(tp, timeout_ms=5000)
        assert [record.value for record in fetched[tp]] == [b"fits"]


async def test_a_producer_keeps_few_records_unacknowledged_and_loses_none(
    source_cluster: KafkaClusterSettings, vm_id: str
) -> None:
    # More would make librdkafka's broker thread busy-poll (see MAX_UNACKED_RECORDS).
    spec = await created_topic(source_cluster, vm_id)
    values = [bytes([i]) * (64 * KiB) for i in range(40)]
    most = 0
    async with Producer(source_cluster, linger_ms=0) as producer:
        deliveries = []
        for value in values:
            deliveries.append(await producer.send(spec.name, value, partition=0))
            most = max(most, producer.unacked_records)
        offsets = [(await delivery).offset for delivery in deliveries]
        assert producer.unacked_records == 0
    # Sends outpace acknowledgements on any machine: the bound is reached, never passed.
    assert most == MAX_UNACKED_RECORDS, f"at most {most} records were unacknowledged"
    assert offsets == sorted(offsets)
    assert await read_topic(source_cluster, spec.name) == values


async def test_a_send_waiting_for_room_fails_when_the_producer_is_aborted(
    source_cluster: KafkaClusterSettings, vm_id: str
) -> None:
    spec = await created_topic(source_cluster, vm_id)

    class Unanswered:
        """librdkafka, but the records it takes are never acknowledged."""

        def __init__(self, driver: rdkafka.Producer) -> None:
            self._driver = driver

        def produce(self, *args: object, **kwargs: object) -> None:
            pass

        def __getattr__(self, name: str) -> object:
            return getattr(self._driver, name)

    producer = Producer(source_cluster)
    await producer.start()
    producer._producer = Unanswered(producer.driver)  # type: ignore[assignment]
    for _ in range(MAX_UNACKED_RECORDS):
        await producer.send(spec.name, b"queued", partition=0)
    waiting = asyncio.create_task(producer.send(spec.name, b"waits for room", partition=0))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await producer.abort()
    with pytest.raises(KafkaFatal, match="not started"):
        await asyncio.wait_for(waiting, 5)


async def test_zstd_compressed_records_round_trip(
    source_cluster: KafkaClusterSettings, vm_id: str
) -> None:
    spec = await created_topic(source_cluster, vm_id)
    values = [bytes([i]) * (256 * KiB) for i in range(6)]
    async with Producer(source_cluster, compression_type="zstd", linger_ms=50) as producer:
        deliveries = [await producer.send(spec.name, value, key=b"k") for value in values]
        for delivery in deliveries:
            await delivery
    tp = TopicPartition(spec.name, 0)
    async with Consumer(source_cluster) as consumer:
        consumer.assign([tp])
        assert (await consumer.end_offsets([tp]))[tp] == len(values)
        received: list[bytes] = []
        while len(received) < len(values):
            fetched = await consumer.getmany(tp, timeout_ms=5000)
            assert fetched, "no records within 5 s"
            received += [record.value for record in fetched[tp]]
        assert received == values
        assert await consumer.position(tp) == len(values)


async def test_a_fetch_waiting_for_more_bytes_still_returns_a_small_record(
    source_cluster: KafkaClusterSettings, vm_id: str
) -> None:
    # The receiver asks for 1 MiB per fetch: a quiet VM's few bytes must still arrive once
    # the fetch's wait is over, without more data behind them.
    spec = await created_topic(source_cluster, vm_id)
    tp = TopicPartition(spec.name, 0)
    async with Consumer(source_cluster, fetch_min_bytes=8 * MiB, fetch_max_wait_ms=50) as consumer:
        # What the fetch requests carry: the driver's fetcher got both bounds.
        fetcher = consumer.driver._fetcher
        assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == (8 * MiB, 50)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        async with Producer(source_cluster) as producer:
            await (await producer.send(spec.name, b"a quiet write"))
        fetched: dict[TopicPartition, list[Any]] = {}
        for _ in range(10):
            fetched = await consumer.getmany(tp, timeout_ms=1000)
            if fetched:
                break
        assert [record.value for record in fetched.get(tp, [])] == [b"a quiet write"]


async def test_a_newer_transactional_producer_fences_the_older_one(
    target_cluster: KafkaClusterSettings, vm_id: str
) -> None:
    spec = await created_topic(target_cluster, vm_id)
    txn_id = f"dm-tx-{vm_id}"
    async with TransactionalProducer(target_cluster, transactional_id=txn_id) as old:
        async with old.transaction():
            await old.send(spec.name, b"from the old one")
        async with TransactionalProducer(target_cluster, transactional_id=txn_id) as new:
            with pytest.raises(ProducerFenced):
                async with old.transaction():
                    await old.send(spec.name, b"zombie write")
            async with new.transaction():
                await new.send(spec.name, b"from the new one")
    assert await read_topic(target_cluster, spec.name) == [
        b"from the old one",
        b"from the new one",
    ]


async def test_a_refused_record_fails_its_transaction_without_being_awaited(
    source_cluster: KafkaClusterSettings, vm_id: str
) -> None:
    spec = one_topic(vm_id, max_message_bytes=64 * KiB)
    group = f"dm-test-{vm_id}"
    source = TopicPartition(topic_name(Stream.TAP, vm_id), 0)
    async with Admin(source_cluster) as admin:
        await admin.create_topics([spec])
    txn_id = f"dm-tx-refused-{vm_id}"
    unhandled: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(
        lambda _loop, context: unhandled.append(context)
    )
    async with TransactionalProducer(
        source_cluster, transactional_id=txn_id, max_request_size=MiB
    ) as producer:
        # The callers rely on this: the commit itself reports a record the broker refused,
        # with that record's own error.
        with pytest.raises(MessageTooLarge):
            async with producer.transaction():
                await producer.send(spec.name, b"fits", partition=0)
                await producer.send(spec.name, b"x" * (200 * KiB), partition=0)
                producer.send_offsets_to_transaction({source: 7}, group)
    gc.collect()
    await asyncio.sleep(0)
    assert not unhandled, "a delivery nobody awaited was logged as never retrieved"
    async with (
        TransactionalProducer(source_cluster, transactional_id=txn_id) as producer,
        producer.transaction(),
    ):
        await producer.send(spec.name, b"committed", partition=0)
    async with Consumer(source_cluster, group_id=group) as consumer:
        assert await consumer.committed(source) is None
    assert await read_topic(source_cluster, spec.name) == [b"committed"]


class _IdleDriver:
    """A librdkafka producer stand-in for the wrapper's lifecycle: nothing to deliver."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def poll(self, timeout: float) -> int:
        threading.Event().wait(timeout)
        return 0

    def list_topics(self, timeout: float | None = None) -> None:
        return None

    def flush(self, timeout: float | None = None) -> int:
        return 0

    def purge(self, *args: Any) -> None:
        pass


async def test_a_start_while_a_stop_tears_down_leaves_no_report_thread_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A receiver reopening a VM restarts its producer while the close of a failed
    # transaction's producer may still be joining the delivery-report thread.
    monkeypatch.setattr(rdkafka, "Producer", _IdleDriver)
    producer = Producer(KafkaClusterSettings(bootstrap_servers="127.0.0.1:1", client_id="lc"))
    await producer.start()
    stopping = asyncio.create_task(producer.stop())
    await asyncio.sleep(0.01)  # the stop is joining the report thread now
    await producer.start()
    await asyncio.wait_for(stopping, 5)
    await asyncio.wait_for(producer.stop(), 5)
    assert not [t for t in threading.enumerate() if t.name == "kafka-deliveries-lc"]
