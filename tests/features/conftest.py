"""The store tests run on both backends: `store_url` is a SQLite file, then a fresh PostgreSQL
database (tests/pg.py; those cases skip, saying how to install PostgreSQL, where it cannot start)."""
import pytest

from tests.pg import BACKENDS, backend_url


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path):
    return backend_url(request, tmp_path)


@pytest.fixture
def other_store_url(request, store_url, tmp_path):
    """A second, empty store on the same backend as `store_url`."""
    if store_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'other.db'}"
        return
    server = request.getfixturevalue("postgres")
    name = server.database()
    yield server.url(name)
    server.drop(name)
