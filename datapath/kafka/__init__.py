"""Kafka plumbing shared by every service: thin wrappers over aiokafka (consumer, admin)
and librdkafka (producers, see :mod:`datapath.kafka.producer`).

One small class each (:class:`Producer`, :class:`TransactionalProducer`, :class:`Consumer`,
:class:`Admin`) with ``start()``/``stop()`` and ``async with``; driver errors become the
domain errors of :mod:`datapath.kafka.errors`, and :func:`retrying` is the one place that
decides whether to try again. See docs/kafka.md.
"""

from datapath.kafka.admin import Admin, TopicDescription, topic_id
from datapath.kafka.consumer import Consumer
from datapath.kafka.deadline import within
from datapath.kafka.errors import (
    KafkaError,
    KafkaFatal,
    KafkaMetrics,
    KafkaUnavailable,
    MessageTooLarge,
    ProducerFenced,
    TopicExists,
    UnknownTopic,
    backoff_delay,
    retrying,
    translate,
)
from datapath.kafka.producer import (
    MAX_UNACKED_RECORDS,
    REQUEST_SLACK,
    Delivery,
    Producer,
    TransactionalProducer,
)
from datapath.kafka.settings import KafkaClusterSettings

__all__ = [
    "MAX_UNACKED_RECORDS",
    "REQUEST_SLACK",
    "Admin",
    "Consumer",
    "Delivery",
    "KafkaClusterSettings",
    "KafkaError",
    "KafkaFatal",
    "KafkaMetrics",
    "KafkaUnavailable",
    "MessageTooLarge",
    "Producer",
    "ProducerFenced",
    "TopicDescription",
    "TopicExists",
    "TransactionalProducer",
    "UnknownTopic",
    "backoff_delay",
    "retrying",
    "topic_id",
    "translate",
    "within",
]
