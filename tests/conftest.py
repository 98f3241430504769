import functools

import pytest

from tests.interpreted_runs import RUNS
from tests.server_process import ServerProcess


@pytest.fixture(scope="session")
def server():
    """One tiny-random server with two CPU replicas, shared by the end-to-end tests."""
    with ServerProcess("--cpu-replicas", "2") as process:
        yield process


@pytest.fixture(scope="session", autouse=True)
def cuda_probed_once():
    """Each in-process front end asks a throwaway process whether CUDA is there (a torch
    import, over a second); the answer cannot change within a session, so it is asked once.
    Server subprocesses still ask for themselves."""
    import server

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server, "_cuda_available", functools.cache(server._cuda_available))
        yield


@pytest.fixture(scope="session", autouse=True)
def codecs_loaded_once():
    """`load_engine` loads the model's tokenizer (most of a second) for its EOS ids at every
    call, some eighty times a session, nearly all of them the vendored one's. Its files never
    change, so the codec for each of its chat templates is loaded once and shared (a codec
    holds no per-use state); a tokenizer a test writes is loaded as before."""
    from replica.loading.source import VENDORED_TOKENIZER, ModelSource

    codecs = {}
    load = ModelSource.codec

    def codec(source: ModelSource):
        if source.tokenizer_dir != VENDORED_TOKENIZER:
            return load(source)
        if source.chat_template not in codecs:
            codecs[source.chat_template] = load(source)
        return codecs[source.chat_template]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModelSource, "codec", codec)
        yield


@pytest.fixture(scope="session")
def interpreted_runs():
    """The interpreted kernel checks, started in the background (tests/interpreted_runs.py)."""
    return RUNS


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the selected interpreted kernel checks, in the order they were collected."""
    selected = [
        item for item in session.items if "interpreted_runs" in getattr(item, "fixturenames", ())
    ]
    if selected:
        RUNS.start([item.callspec.params["check"] for item in selected])


def pytest_sessionfinish() -> None:
    """No interpreted check outlives the session (an interrupted or -x run)."""
    RUNS.stop()
