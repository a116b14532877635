"""One exception hierarchy for every service, each error carrying its gRPC status code.

Services raise these; `moe_serve.runtime.grpc_utils.ErrorMappingInterceptor` is the single place that
turns them into gRPC statuses. Messages are written for the person who sent the request: they
say what was wrong and what to do, and never contain a stack trace.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from moe_serve.protos import moe_serve_pb2 as moe_pb2

# Status messages travel in gRPC metadata, whose size stock clients cap (8 KiB by default): a message
# naming everything a request got wrong (1,000 unknown output names) would reach the client as a
# metadata overflow instead of the error. Messages name the first few offenders, each cut short.
MAX_LISTED = 5
MAX_QUOTED_CHARS = 64


def quoted(value: str, max_chars: int = MAX_QUOTED_CHARS) -> str:
    """`repr(value)`, cut to its first `max_chars` characters when longer (saying how long it was)."""
    if len(value) <= max_chars:
        return repr(value)
    return f"{value[:max_chars]!r}... ({len(value)} characters)"


def listed(items: Iterable[object], max_items: int = MAX_LISTED) -> str:
    """A list for an error message: the first `max_items` items (strings quoted and cut short by
    `quoted`), then how many more there are, e.g. `['a', 'b', 'c', 'd', 'e', ... and 995 more]`."""
    every = list(items)
    shown = [quoted(item) if isinstance(item, str) else repr(item) for item in every[:max_items]]
    if len(every) > max_items:
        shown.append(f"... and {len(every) - max_items} more")
    return f"[{', '.join(shown)}]"


class MoEServeError(Exception):
    """Base class: an error with a gRPC status code and a message a person can act on."""

    status_code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        # machine-readable cause where one exists (e.g. which admission bound refused), for metrics
        self.reason = reason


class InvalidInput(MoEServeError):
    """The request is malformed: wrong tensor, shape, datatype or parameter."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(MoEServeError):
    """The request names a model or version this server does not serve."""

    status_code = grpc.StatusCode.NOT_FOUND


class RequestNotFound(MoEServeError):
    """An internal message refers to a request the gateway no longer tracks (finished or expired)."""

    status_code = grpc.StatusCode.NOT_FOUND


class RegionNotFound(MoEServeError):
    """A request names a shared-memory region, or a key, that does not exist (or is not registered)."""

    status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MoEServeError):
    """A registration under a name that is already taken."""

    status_code = grpc.StatusCode.ALREADY_EXISTS


class Unimplemented(MoEServeError):
    """A protocol feature this server declares but does not offer (or has switched off)."""

    status_code = grpc.StatusCode.UNIMPLEMENTED


class Overloaded(MoEServeError):
    """Admission refused the work: a bound on in-flight work would be exceeded."""

    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ExpertUnavailable(MoEServeError):
    """No live replica can compute an expert the request needs."""

    status_code = grpc.StatusCode.UNAVAILABLE


class NotReady(MoEServeError):
    """The service is starting or draining and cannot take the call yet."""

    status_code = grpc.StatusCode.UNAVAILABLE


class ServiceUnavailable(MoEServeError):
    """Another service of the stack could not be reached, or its stream broke."""

    status_code = grpc.StatusCode.UNAVAILABLE


class ExpertNotHere(MoEServeError):
    """Rows arrived for an expert this worker does not (or no longer) hold: the router's view was
    stale for a moment; another replica can take them (retryable, hence UNAVAILABLE)."""

    status_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(MoEServeError):
    """The request's deadline passed before its result was complete."""

    status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class DeliveryFailed(MoEServeError):
    """A worker computed its rows but could not hand them to the gateway that owns the request."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


class ConfigurationError(Exception):
    """Invalid configuration or checkpoint, reported at start-up (never inside a request)."""


def failure_of(error: MoEServeError) -> moe_pb2.Failure:
    """The wire form of an error, for replies on the internal streams."""
    return moe_pb2.Failure(code=error.status_code.value[0], message=error.message, reason=error.reason)


def error_of(failure: moe_pb2.Failure) -> MoEServeError:
    """The domain error a Failure received on a stream stands for."""
    error = error_from_status(status_code_from_number(failure.code), failure.message)
    error.reason = failure.reason
    return error


def error_from_status(code: grpc.StatusCode, message: str) -> MoEServeError:
    """Rebuild a domain error from a status received from another service, keeping its code."""
    for cls in (InvalidInput, ModelNotFound, Overloaded, ExpertUnavailable, DeadlineExceeded, DeliveryFailed):
        if cls.status_code == code:
            return cls(message)
    error = MoEServeError(message)
    error.status_code = code
    return error


_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code_from_number(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode with wire number `number` (UNKNOWN for numbers gRPC does not define)."""
    return _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


class Unauthenticated(MoEServeError):
    """The call carries no valid credentials (the REST transport's bearer-token check)."""

    status_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MoEServeError):
    """The caller's credentials do not grant what the call asks for."""

    status_code = grpc.StatusCode.PERMISSION_DENIED
