"""Topic and consumer-group administration of one cluster."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiokafka.errors as driver
import confluent_kafka as rdkafka
import confluent_kafka.admin as rdkafka_admin
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.structs import TopicPartition

from datapath.kafka.errors import (
    DRIVER_ERRORS,
    RDKAFKA_ERRORS,
    KafkaFatal,
    TopicExists,
    UnknownTopic,
    translate,
)
from datapath.kafka.lifecycle import AsyncClient, start_or_release
from datapath.kafka.settings import KafkaClusterSettings
from datapath.topics import TopicSpec

log = logging.getLogger(__name__)

_NO_ERROR = 0
_UNKNOWN_TOPIC = driver.UnknownTopicOrPartitionError.errno
_TOPIC_EXISTS = driver.TopicAlreadyExistsError.errno


@dataclass(frozen=True)
class TopicDescription:
    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str] = field(default_factory=dict)


def _error(code: int, message: str | None, subject: str) -> Exception:
    error_class: type[Exception] = driver.for_code(code)
    return error_class(f"{subject}: {message}" if message else subject)


# The id of no topic (a broker too old to give topics ids answers with it).
_NO_TOPIC_ID = str(rdkafka.Uuid(0, 0))


async def topic_id(
    cluster: KafkaClusterSettings, name: str, *, timeout_s: float = 15.0
) -> str | None:
    """The id Kafka gave the topic when it was created: a topic deleted and created again
    under the same name has another (None from a broker that gives topics none). Asked
    through librdkafka's admin client (aiokafka's does not return it); UnknownTopic when
    there is no such topic."""

    def describe() -> str | None:
        client = rdkafka_admin.AdminClient(cluster.rdkafka_config())
        futures = client.describe_topics(rdkafka.TopicCollection([name]), request_timeout=timeout_s)
        found = futures[name].result(timeout=timeout_s).topic_id
        return None if found is None or str(found) == _NO_TOPIC_ID else str(found)

    try:
        return await asyncio.to_thread(describe)
    except RDKAFKA_ERRORS as exc:
        raise translate(exc) from exc


class Admin(AsyncClient):
    """Creates, describes and deletes topics; reads consumer-group offsets."""

    def __init__(
        self,
        cluster: KafkaClusterSettings,
        *,
        request_timeout_ms: int = 30_000,
        client_id: str | None = None,
    ) -> None:
        self.cluster = cluster
        self._kwargs: dict[str, Any] = {
            **cluster.client_kwargs(),
            "request_timeout_ms": request_timeout_ms,
        }
        if client_id is not None:
            self._kwargs["client_id"] = client_id
        self._admin: AIOKafkaAdminClient | None = None

    @property
    def driver(self) -> AIOKafkaAdminClient:
        if self._admin is None:
            raise KafkaFatal("Admin is not started")
        return self._admin

    async def start(self) -> None:
        if self._admin is not None:
            return
        admin = AIOKafkaAdminClient(**self._kwargs)
        await start_or_release(admin.start, admin.close, what="admin client")
        self._admin = admin

    async def stop(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                await admin.close()
            except DRIVER_ERRORS as exc:
                raise translate(exc) from exc

    async def create_topics(self, specs: Iterable[TopicSpec]) -> list[str]:
        """Create the topics that do not exist; return the names created.

        Idempotent: a topic that already exists with the spec's partitions, replication
        factor and configs is fine; one that differs raises :class:`TopicExists` naming
        the differences (topics are never silently reconfigured).
        """
        by_name = {spec.name: spec for spec in specs}
        if not by_name:
            return []
        request = [
            NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=dict(s.configs))
            for s in by_name.values()
        ]
        try:
            response = await self.driver.create_topics(request)
        except DRIVER_ERRORS as exc:
            raise translate(exc) from exc
        created, existing = [], []
        for result in response.to_object()["topic_errors"]:
            name, code = result["topic"], result["error_code"]
            if code == _NO_ERROR:
                created.append(name)
            elif code == _TOPIC_EXISTS:
                existing.append(name)
            else:
                cause = _error(code, result.get("error_message"), f"creating topic {name}")
                raise translate(cause) from cause
        if existing:
            await self._check_existing([by_name[name] for name in existing])
        if created:
            log.info("created topics on %s: %s", self.cluster.bootstrap_servers, created)
        return created

    async def _check_existing(self, specs: list[TopicSpec]) -> None:
        described = await self.describe_topics(spec.name for spec in specs)
        problems = []
        for spec in specs:
            actual = described[spec.name]
            if actual.partitions != spec.partitions:
                problems.append(
                    f"{spec.name}: {actual.partitions} partitions, not {spec.partitions}"
                )
            if actual.replication_factor != spec.replication_factor:
                problems.append(
                    f"{spec.name}: replication factor {actual.replication_factor}, "
                    f"not {spec.replication_factor}"
                )
            for key, wanted in spec.configs.items():
                if actual.configs.get(key) != wanted:
                    problems.append(f"{spec.name}: {key}={actual.configs.get(key)}, not {wanted}")
        if problems:
            raise TopicExists("topics exist with another configuration: " + "; ".join(problems))

    async def list_topics(self) -> set[str]:
        """Every topic name, internal ones (``__consumer_offsets``...) excluded."""
        try:
            names = await self.driver.list_topics()
        except DRIVER_ERRORS as exc:
            raise translate(exc) from exc
        return {name for name in names if not name.startswith("__")}

    async def describe_topics(self, names: Iterable[str]) -> dict[str, TopicDescription]:
        """Partitions, replication factor and configs; :class:`UnknownTopic` if one is missing."""
        wanted = list(names)
        if not wanted:
            return {}
        try:
            topics = await self.driver.describe_topics(wanted)
            config_responses = await self.driver.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, name) for name in wanted]
            )
        except DRIVER_ERRORS as exc:
            raise translate(exc) from exc
        configs: dict[str, dict[str, str]] = {}
        for response in config_responses:
            for resource in response.to_object()["resources"]:
                name = resource["resource_name"]
                if resource["error_code"] != _NO_ERROR:
                    cause = _error(resource["error_code"], resource["error_message"], name)
                    raise translate(cause) from cause
                configs[name] = {
                    entry["config_names"]: entry["config_value"]
                    for entry in resource["config_entries"]
                }
        result = {}
        for topic in topics:
            name = topic["topic"]
            if topic["error_code"] != _NO_ERROR:
                cause = _error(topic["error_code"], None, f"describing topic {name}")
                raise translate(cause) from cause
            partitions = topic["partitions"]
            result[name] = TopicDescription(
                name=name,
                partitions=len(partitions),
                replication_factor=max((len(p["replicas"]) for p in partitions), default=0),
                configs=configs.get(name, {}),
            )
        missing = set(wanted) - result.keys()
        if missing:
            raise UnknownTopic(f"topics not found: {sorted(missing)}")
        return result

    async def delete_topics(self, names: Iterable[str]) -> None:
        """Delete these topics; ones already gone are fine."""
        wanted = list(names)
        if not wanted:
            return
        try:
            response = await self.driver.delete_topics(wanted)
        except DRIVER_ERRORS as exc:
            raise translate(exc) from exc
        for result in response.to_object()["topic_error_codes"]:
            code = result["error_code"]
            if code not in (_NO_ERROR, _UNKNOWN_TOPIC):
                cause = _error(code, None, f"deleting topic {result['topic']}")
                raise translate(cause) from cause
        log.info("deleted topics on %s: %s", self.cluster.bootstrap_servers, wanted)

    async def group_offsets(self, group_id: str) -> dict[TopicPartition, int]:
        """The offsets committed by consumer group ``group_id`` (e.g. inside transactions)."""
        try:
            offsets = await self.driver.list_consumer_group_offsets(group_id)
        except DRIVER_ERRORS as exc:
            raise translate(exc) from exc
        return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
