"""Idempotency keys for the enqueue endpoints: a client that sends ``Idempotency-Key`` and
retries (a timeout, a dropped connection) gets the first answer again, with the same task ids,
and nothing is queued twice.

- The first request with a key claims it (a row, unique per token holder and key, in the same
  database as everything else: exact across web processes, and there in a RabbitMQ-only
  deployment too), runs, and stores its 202 answer with the key.
- A retry with the same key and the same body (the same endpoint and validated values) gets that
  answer, with ``Idempotent-Replayed: true``; with another body, a 422; while the first request
  still runs, a 409.
- An answer other than 202 (bad input, the broker down: nothing was queued) releases the key,
  so the retry runs for real.
- Keys expire after IDEMPOTENCY_KEY_TTL_SECONDS (a day by default); beat deletes expired ones
  hourly. A claim whose request died before it stored its answer is taken over after
  ABANDONED_AFTER.

Only requests with the header pay for this (an INSERT, then an UPDATE); the others are untouched.
"""

import functools
import hashlib
import inspect
import json

from django.http import JsonResponse
from ninja import Header, Status

from app import services

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
# Printable ASCII without spaces, as a UUID or any client-made token is.
KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"

# The header as django-ninja declares it: documented in the schema, checked before the view runs.
KEY_HEADER = Header(
    None,
    alias=HEADER,
    pattern=KEY_PATTERN,
    description="Any unique string (a UUID, say) of at most 255 printable characters: a retry with the same "
    "key and body gets the first answer again and queues nothing.",
)


def idempotent(view):
    """Give an enqueue view an optional ``Idempotency-Key`` header (its request's ``auth`` is an
    app.api_tokens.Grant: keys are per holder of the token)."""

    @functools.wraps(view)
    def with_key(request, *args, idempotency_key: str | None = None, **kwargs):
        if idempotency_key is None:
            return view(request, *args, **kwargs)
        claim = services.claim_idempotency_key(
            holder=request.auth.holder, key=idempotency_key, fingerprint=_fingerprint(request.path, kwargs)
        )
        if claim.response is not None:
            return JsonResponse(claim.response, status=202, headers={REPLAYED_HEADER: "true"})
        if claim.conflict:
            return Status(claim.conflict, {"detail": claim.detail})
        try:
            answer = view(request, *args, **kwargs)
        except BaseException:
            services.release_idempotency_key(claim.row)
            raise
        if isinstance(answer, Status) and answer.status_code == 202:
            services.store_idempotent_answer(claim.row, response=answer.value)
        else:
            services.release_idempotency_key(claim.row)
        return answer

    signature = inspect.signature(view)
    key_parameter = inspect.Parameter(
        "idempotency_key", inspect.Parameter.KEYWORD_ONLY, default=KEY_HEADER, annotation=str | None
    )
    with_key.__signature__ = signature.replace(parameters=[*signature.parameters.values(), key_parameter])
    return with_key


def _fingerprint(path: str, inputs: dict) -> str:
    """The endpoint and its validated inputs: the same values in another order or spacing, or
    with a default spelled out, are the same request."""
    values = {
        name: value.model_dump(mode="json") if hasattr(value, "model_dump") else value for name, value in inputs.items()
    }
    return hashlib.sha256(json.dumps([path, values], sort_keys=True, default=str).encode()).hexdigest()
