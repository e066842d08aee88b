"""Shared fixtures: two real local Kafka sites and a throwaway PostgreSQL, started lazily.

Nothing starts unless a test asks for it: pure unit tests never start a broker. The sites
start once per session (both brokers in parallel) and stop at its end. A broker or database
that cannot start makes the tests that need it fail (error) with its log tail, never skip.

External brokers instead of local ones: ``--kafka-source HOST:PORT --kafka-target HOST:PORT``.
Tests get the sites' addresses from ``source_site.bootstrap`` / ``target_site.bootstrap``
or ready-made settings from ``source_cluster`` / ``target_cluster``; a test that stops or
kills a broker starts its own ``KafkaSite`` under ``tmp_path`` instead of touching these.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from datapath.kafka.settings import KafkaClusterSettings
from datapath.localpg import LocalPostgres
from datapath.localsite import KafkaSite, LocalSites


@dataclass(frozen=True)
class ExternalSite:
    """A Kafka cluster this test session did not start (given by --kafka-source/target)."""

    name: str
    bootstrap: str


Site = KafkaSite | ExternalSite


@dataclass(frozen=True)
class Sites:
    source: Site
    target: Site


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("datamover")
    group.addoption(
        "--kafka-source",
        metavar="HOST:PORT",
        help="bootstrap servers of an external source cluster (instead of a local site)",
    )
    group.addoption(
        "--kafka-target",
        metavar="HOST:PORT",
        help="bootstrap servers of an external target cluster (instead of a local site)",
    )


@pytest.fixture(scope="session")
def sites(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sites]:
    """The source and target Kafka sites of this test session."""
    source = request.config.getoption("--kafka-source")
    target = request.config.getoption("--kafka-target")
    if source or target:
        if not (source and target):
            raise pytest.UsageError("--kafka-source and --kafka-target go together")
        yield Sites(ExternalSite("source", source), ExternalSite("target", target))
        return
    # A SiteError here (with the broker's log tail) errors every test that needs a site.
    local = LocalSites.start(tmp_path_factory.mktemp("kafka-sites"))
    try:
        yield Sites(local.source, local.target)
    finally:
        local.stop()


@pytest.fixture(scope="session")
def source_site(sites: Sites) -> Site:
    return sites.source


@pytest.fixture(scope="session")
def target_site(sites: Sites) -> Site:
    return sites.target


@pytest.fixture(scope="session")
def source_cluster(source_site: Site) -> KafkaClusterSettings:
    return KafkaClusterSettings(bootstrap_servers=source_site.bootstrap, client_id="dm-test")


@pytest.fixture(scope="session")
def target_cluster(target_site: Site) -> KafkaClusterSettings:
    return KafkaClusterSettings(bootstrap_servers=target_site.bootstrap, client_id="dm-test")


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """A throwaway PostgreSQL server for the session (``.url`` for SQLAlchemy, ``.dsn``)."""
    pg = LocalPostgres.start(tmp_path_factory.mktemp("postgres"))
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture
def vm_id() -> str:
    """A VM id no other test uses, so tests sharing the session's sites never collide."""
    return f"vm-{uuid.uuid4().hex[:12]}"


LoopDevices = Callable[[int], tuple[str, Path]]


@pytest.fixture
def loop_devices(tmp_path: Path) -> Iterator[LoopDevices]:
    """`attach(size)`: a loop device over a new sparse file of `size` bytes in tmp_path,
    (device, backing file), detached after the test.

    Where the machine offers loop devices (root, /dev/loop-control), failing to set one
    up fails the test: a block-device backend must not pass untested on CI. Elsewhere
    (an unprivileged sandbox) the test is an expected failure, saying why."""
    attached: list[str] = []

    def attach(size: int) -> tuple[str, Path]:
        backing = tmp_path / f"loop-backing-{len(attached)}.img"
        with open(backing, "wb") as handle:
            handle.truncate(size)
        supported = os.geteuid() == 0 and os.path.exists("/dev/loop-control")
        problem = None
        if shutil.which("losetup") is None:
            problem = "losetup is not installed"
        else:
            result = subprocess.run(
                ["losetup", "--find", "--show", str(backing)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode == 0:
                attached.append(result.stdout.strip())
                return attached[-1], backing
            problem = f"losetup failed: {result.stderr.strip()}"
        if supported:
            pytest.fail(f"this machine offers loop devices, yet {problem}")
        pytest.xfail(f"no block device can be tested here: {problem}")

    yield attach
    for device in attached:
        subprocess.run(["losetup", "-d", device], check=False)
