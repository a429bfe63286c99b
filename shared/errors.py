"""Errors as reasons: one line, bounded, naming what is wrong and never echoing the input (an
input may be huge, hostile or hold a secret). Used by every dead letter and rejection."""

from __future__ import annotations

from pydantic import ValidationError

REASON_MAX = 2000
PROBLEMS_MAX = 5


def validation_reason(exc: ValidationError, whole: str = "payload") -> str:
    """`field.path: message; ...` for the first few problems of a pydantic error; `whole` names
    a problem of the input as a whole."""
    problems = [
        f"{'.'.join(str(part) for part in error['loc']) or whole}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False)[:PROBLEMS_MAX]
    ]
    more = len(exc.errors()) - PROBLEMS_MAX
    return ("; ".join(problems) + (f"; and {more} more" if more > 0 else ""))[:REASON_MAX]


def describe(exc: BaseException) -> str:
    """Any error as one reason: a validation error's problems, else its type and message (not
    repr(): redis-py's errors repr as their type alone)."""
    if isinstance(exc, ValidationError):
        return validation_reason(exc)
    return f"{type(exc).__name__}: {exc}"[:REASON_MAX]
