"""Schemathesis hooks for tests/test_api_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

An Idempotency-Key names one request: the same key with another body is a 422 by design
(app/idempotency.py). Schemathesis draws keys from a small space ("0", "null") and reuses them
across bodies, so a valid case's key is replaced with a new UUID before it is sent, as a client
does; a malformed key (a negative case) is sent as drawn.

Three rules of the API relate two fields, which JSON Schema cannot say: a report's `since`
before its `until`, a time-limited task's `soft_time_limit` below its `time_limit`, and a
progress task's total_steps x step_seconds within its soft time limit. Schema-valid data can break
them, so tests/schemathesis.toml turns positive_data_acceptance off for those two operations,
and this check takes its place there: valid data may be refused only with a 422 naming one of
those rules, nothing else."""

import uuid

import schemathesis

IDEMPOTENCY_KEY = "Idempotency-Key"

CROSS_FIELD_RULES = (
    "since must be earlier than until",
    "soft_time_limit must be lower than time_limit",
    "the task's soft time limit is",
)
OPERATIONS = {"/api/long-task/", "/api/generate-report/"}


@schemathesis.hook
def before_call(context, case, kwargs):
    meta = case.meta
    if case.headers and IDEMPOTENCY_KEY in case.headers and meta is not None and meta.generation.mode.is_positive:
        case.headers[IDEMPOTENCY_KEY] = str(uuid.uuid4())


@schemathesis.check
def valid_data_is_refused_only_for_a_cross_field_rule(ctx, response, case):
    meta = case.meta
    if case.path not in OPERATIONS or meta is None or not meta.generation.mode.is_positive:
        return None
    if response.status_code < 300:
        return None
    assert response.status_code == 422, f"valid data answered {response.status_code}, not 2xx or 422"
    errors = response.json()["detail"]
    assert isinstance(errors, list), f"valid data refused: {errors}"
    for error in errors:
        assert error["type"] == "value_error", f"valid data refused: {error}"
        assert any(rule in error["msg"] for rule in CROSS_FIELD_RULES), f"valid data refused: {error}"
    return None
