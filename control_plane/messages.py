"""Exceptions in words for logs and status fields."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An exception in one short line (drivers and Ray write paragraphs), for logs and status
    fields; the exception's type when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
