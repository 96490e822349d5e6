"""Whole numbers in request bodies as the OpenAPI document says them: an integer.

Pydantic's lax `int` takes JSON `true` and `false` as 1 and 0, so a body the schema refuses
would be taken (the schemathesis fuzz sends them). `WholeNumber` refuses a boolean and keeps
the rest of lax parsing: a dashboard form's "5" is still 5.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator


def _not_a_boolean(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be a whole number, not true or false")
    return value


WholeNumber = Annotated[int, BeforeValidator(_not_a_boolean)]
