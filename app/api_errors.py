"""What the JSON API answers around its views: a body it will not read (411, 413, 415), a body
that is not strict JSON (400), and a JSON error body, never Django's HTML page, for any other
error under /api/ (an unknown path, a method not allowed, a server error)."""

import json
from http import HTTPStatus

from django.conf import settings
from django.core.handlers.wsgi import WSGIRequest
from django.http import HttpRequest, HttpResponse, JsonResponse
from ninja.parser import Parser

API_PREFIX = "/api/"
# Methods whose body a view may read: the guard checks their body before any view sees it.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
JSON_CONTENT_TYPE = "application/json"
# An oversize body up to this size is read and thrown away before the 413 goes out: a client that
# sends its whole body before reading (Python's urllib and requests) would otherwise hit a closed
# connection and never see the answer. A larger one is not read: the connection just closes.
DRAIN_AT_MOST_BYTES = 32 * 1024 * 1024
DRAIN_CHUNK_BYTES = 64 * 1024
# Headers of an error response that still say something once its body is JSON.
KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After", "X-Request-ID")


def error_response(status: int, detail: object) -> JsonResponse:
    """The API's error body (schemas.ErrorOut)."""
    return JsonResponse({"detail": detail}, status=status)


class ApiRequestGuard:
    """Django middleware for /api/: refuses a request body it will not read before any view (so
    nothing is queued), and turns every non-JSON error answer into the API's error body.

    Last in MIDDLEWARE: the request logs and django-prometheus count the refused requests too."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not request.path.startswith(API_PREFIX):
            return self.get_response(request)
        response = refused_body(request) or self.get_response(request)
        return _as_json_error(response) if response.status_code >= 400 else response


def refused_body(request: HttpRequest) -> JsonResponse | None:
    """An error answer for a body the API will not read, or None. An empty body passes: the view
    says whether it needed one."""
    if request.method not in BODY_METHODS:
        return None
    raw_length = request.META.get("CONTENT_LENGTH") or ""
    if not raw_length:
        if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
            # Django's WSGI request reads no more than Content-Length: a chunked body would be
            # taken as empty, and its fields silently replaced by defaults.
            return error_response(411, "A request body needs a Content-Length header (chunked bodies are not read).")
        return None
    try:
        length = int(raw_length)
    except ValueError:
        length = -1
    if length < 0:
        return error_response(400, f"Invalid Content-Length {raw_length!r}.")
    limit = settings.API_MAX_BODY_BYTES
    if length > limit:
        if length <= DRAIN_AT_MOST_BYTES:
            while request.read(DRAIN_CHUNK_BYTES):
                pass
        return error_response(413, f"The request body has {length} bytes; at most {limit} are accepted.")
    if length == 0:
        return None
    charset = request.content_params.get("charset", "utf-8").lower()
    if request.content_type != JSON_CONTENT_TYPE or charset not in ("utf-8", "utf8"):
        sent = request.META.get("CONTENT_TYPE") or "none"
        return error_response(
            415, f"Request bodies must be JSON: Content-Type: application/json (UTF-8); got {sent!r}."
        )
    return None


class LenientContentTypeRequest(WSGIRequest):
    """Django's WSGI request, except that a Content-Type naming an unknown RFC 2231 charset
    (`application/json; charset*=bogus''x`) reads as no content type at all, where Django raises
    ValueError while building the request: a 500 before any middleware could answer. The guard
    then refuses the body with a 415. project/wsgi.py makes it the web's request class."""

    def _set_content_type_params(self, meta):
        try:
            super()._set_content_type_params(meta)
        except ValueError:
            self.content_type, self.content_params = "", {}


def _as_json_error(response: HttpResponse) -> HttpResponse:
    if response.get("Content-Type", "").startswith(JSON_CONTENT_TYPE):
        return response
    try:
        detail = HTTPStatus(response.status_code).phrase
    except ValueError:
        detail = "Error"
    if response.status_code == 404:
        detail = "Not Found: no API endpoint at this path."
    replacement = error_response(response.status_code, detail)
    for header in KEPT_HEADERS:
        if header in response:
            replacement[header] = response[header]
    return replacement


class StrictJsonParser(Parser):
    """Request bodies as RFC 8259 JSON: UTF-8 only (json.loads would also take UTF-16 and 32) and
    no NaN or Infinity literals. Any error here is ninja's 400 "Cannot parse request body" (deep
    nesting, a number of over 4,300 digits and invalid UTF-8 included)."""

    def parse_body(self, request: HttpRequest):
        return json.loads(request.body.decode("utf-8"), parse_constant=_refuse_constant)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")
