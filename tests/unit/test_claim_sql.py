"""The common claim's text as the driver gets it: what psycopg parses once and keeps."""

from __future__ import annotations

import re

import psycopg._queries
from psycopg.adapt import Transformer
from sqlalchemy.dialects import postgresql

from control_plane import queue as job_queue

DIALECT = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]


def _words(sql: str) -> list[str]:
    """The statement's words, comments left out: what a reformatting must keep."""
    return re.sub(r"--[^\n]*", " ", sql).split()


def test_the_common_claim_stays_within_psycopgs_parsed_query_cache() -> None:
    # psycopg keeps the parsed form of a query up to this length and parses a longer one again
    # at every execution: the claim runs once per job, on every trainer.
    sql = job_queue._driver_sql(job_queue._claim_head(job_queue.CLAIM_FRONT_LINES), DIALECT)
    assert len(sql) <= psycopg._queries.MAX_CACHED_STATEMENT_LENGTH
    # What psycopg does with it, given the parameters a claim binds: parsed once, then found in
    # the cache (a text over the limit, or too many parameters, would be parsed every time).
    params = job_queue._params(
        worker="w", lease=60, prefer=None, default_limit=4, excluded=["tenant-x"]
    )
    query = psycopg._queries.PostgresQuery(Transformer())
    query.convert(sql, params)
    hits = psycopg._queries._query2pg.cache_info().hits
    query.convert(sql, params)
    assert psycopg._queries._query2pg.cache_info().hits == hits + 1


def test_the_drivers_text_is_the_statement_without_comments_and_indentation() -> None:
    for statement in (
        job_queue._claim_head(job_queue.CLAIM_FRONT_LINES),
        job_queue._claim_front(job_queue.CLAIM_FRONT_LINES),
        job_queue._CLAIM_RANKED,
    ):
        sql = job_queue._driver_sql(statement, DIALECT)
        compiled = str(statement.compile(dialect=DIALECT))
        assert "--" not in sql
        assert _words(sql) == _words(compiled)
        assert all(line == line.strip() and line for line in sql.splitlines())
