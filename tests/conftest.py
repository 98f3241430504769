import pytest

from tests.server_process import ServerProcess


@pytest.fixture(scope="session")
def server():
    """One tiny-random server with two CPU replicas, shared by the end-to-end tests."""
    with ServerProcess("--cpu-replicas", "2") as process:
        yield process
