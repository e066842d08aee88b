"""The receiver's consumer: a group member with static membership and a rebalance listener.

``datapath.kafka.Consumer`` covers subscription without a listener; the receiver must act
on every assignment change (fence the previous owner's transactions, reload the VM's
state) before it reads a record, so this subclass adds the listener and the group timing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import aiokafka.errors as driver
from aiokafka.abc import ConsumerRebalanceListener

from datapath.kafka import Consumer, KafkaClusterSettings, translate

_DRIVER_ERRORS = (driver.KafkaError, driver.IllegalOperation, OSError)


class GroupConsumer(Consumer):
    def __init__(
        self,
        cluster: KafkaClusterSettings,
        *,
        group_id: str,
        group_instance_id: str | None = None,
        session_timeout_ms: int = 10_000,
        metadata_max_age_ms: int = 30_000,
        **kwargs: Any,
    ) -> None:
        super().__init__(cluster, group_id=group_id, **kwargs)
        self._kwargs["group_instance_id"] = group_instance_id
        self._kwargs["session_timeout_ms"] = session_timeout_ms
        self._kwargs["heartbeat_interval_ms"] = max(1_000, session_timeout_ms // 4)
        # Tap topics created after the receiver started are picked up within this time.
        self._kwargs["metadata_max_age_ms"] = metadata_max_age_ms

    def subscribe_with_listener(
        self, topics: Iterable[str], listener: ConsumerRebalanceListener
    ) -> None:
        """Joins the group for ``topics``; ``listener`` runs on every assignment change."""
        try:
            self.driver.subscribe(topics=list(topics), listener=listener)
        except _DRIVER_ERRORS as exc:
            raise translate(exc) from exc
