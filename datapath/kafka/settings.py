"""How to reach one Kafka cluster: addresses, security, client id.

A plain pydantic model, nested into each service's pydantic-settings class (e.g.
``DM_RECEIVER_KAFKA__BOOTSTRAP_SERVERS``). Secrets are ``SecretStr``: repr, str and JSON
dumps show ``**********``; only :meth:`KafkaClusterSettings.client_kwargs` and
:meth:`KafkaClusterSettings.rdkafka_config` reveal them, to the drivers.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

from aiokafka.helpers import create_ssl_context
from pydantic import BaseModel, ConfigDict, SecretStr, field_validator, model_validator

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaClusterSettings(BaseModel):
    """Connection settings of one Kafka cluster (one site)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str
    """Comma-separated ``host:port`` list."""
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    """CA bundle that signed the brokers' certificates; the system CAs when unset."""
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = None
    client_id: str = "datamover"

    @field_validator("bootstrap_servers")
    @classmethod
    def _addresses_given(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers:
            raise ValueError("bootstrap_servers is empty")
        for server in servers:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"bootstrap server {server!r} is not host:port")
        return ",".join(servers)

    @model_validator(mode="after")
    def _security_is_complete(self) -> KafkaClusterSettings:
        uses_sasl = self.security_protocol.startswith("SASL_")
        if uses_sasl and (
            self.sasl_mechanism is None or self.sasl_username is None or self.sasl_password is None
        ):
            raise ValueError(
                f"{self.security_protocol} needs sasl_mechanism, sasl_username and sasl_password"
            )
        if not uses_sasl and self.sasl_mechanism is not None:
            raise ValueError(
                f"sasl_mechanism is set but security_protocol is {self.security_protocol}"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (client certificate)")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        """A verifying TLS context for SSL/SASL_SSL, None for plaintext protocols."""
        if not self.uses_tls:
            return None
        password = self.ssl_key_password.get_secret_value() if self.ssl_key_password else None
        context: ssl.SSLContext = create_ssl_context(
            cafile=self.ssl_cafile,
            certfile=self.ssl_certfile,
            keyfile=self.ssl_keyfile,
            password=password,
        )
        return context

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments common to aiokafka's consumer and admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "ssl_context": self.ssl_context(),
        }
        if self.sasl_mechanism is not None:
            assert self.sasl_password is not None  # checked by _security_is_complete
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value()
        return kwargs

    def rdkafka_config(self) -> dict[str, Any]:
        """The same settings as librdkafka configuration properties (the producers)."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol.lower(),
        }
        if self.uses_tls:
            config["ssl.endpoint.identification.algorithm"] = "https"
            if self.ssl_cafile is not None:
                config["ssl.ca.location"] = str(self.ssl_cafile)
            if self.ssl_certfile is not None and self.ssl_keyfile is not None:
                config["ssl.certificate.location"] = str(self.ssl_certfile)
                config["ssl.key.location"] = str(self.ssl_keyfile)
            if self.ssl_key_password is not None:
                config["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        if self.sasl_mechanism is not None:
            assert self.sasl_password is not None  # checked by _security_is_complete
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = self.sasl_password.get_secret_value()
        return config

    def describe(self) -> str:
        """One line for logs, without secrets."""
        auth = f" {self.sasl_mechanism} as {self.sasl_username}" if self.sasl_mechanism else ""
        return f"{self.bootstrap_servers} ({self.security_protocol}{auth}, client {self.client_id})"
