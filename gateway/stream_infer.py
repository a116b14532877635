"""Triton's ModelStreamInfer: inferences over one bidirectional stream.

Each request is answered as soon as it is done (completion order, as Triton does for concurrent
requests; the response carries the request's `id` to match it by). A failed request gets a
response whose `error_message` starts with its status name (e.g. "RESOURCE_EXHAUSTED: ..."), so a
client can tell what to retry, and the stream stays open for the next one. At most
`MAX_INFLIGHT_PER_STREAM` requests of a stream are running or answered but not yet written; beyond
that the gateway stops reading the stream, and gRPC flow control holds the client back, so nothing
queues without bound, even for a client that sends and never reads.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from grpc import aio

from moe_serve.runtime.errors import InvalidInput, MoEServeError
from moe_serve.runtime.grpc_utils import Undecodable
from moe_serve_client.protos import grpc_predict_v2_pb2 as kserve_pb2

logger = logging.getLogger(__name__)
MAX_INFLIGHT_PER_STREAM = 64
Answer = Callable[[kserve_pb2.ModelInferRequest], Awaitable[kserve_pb2.ModelInferResponse]]


class UnwrittenAnswers:
    """Requests taken from every open stream whose answers are not written yet: a draining gateway
    waits for them too, not only for admitted requests (an answer computed but not yet written
    would be lost when the server closes)."""

    def __init__(self) -> None:
        self.count = 0


async def answer_stream(
    requests: AsyncIterator[kserve_pb2.ModelInferRequest | Undecodable],
    context: aio.ServicerContext,
    answer: Answer,
    unwritten: UnwrittenAnswers,
) -> None:
    """Read `requests`, run up to MAX_INFLIGHT_PER_STREAM of them at once with `answer`, and write
    one ModelStreamInferResponse per request; return when the client closed its side and every
    answer is written. Cancelling the call cancels the requests still running."""
    responses: asyncio.Queue[kserve_pb2.ModelStreamInferResponse | None] = asyncio.Queue()
    slots = asyncio.Semaphore(MAX_INFLIGHT_PER_STREAM)
    running: set[asyncio.Task[None]] = set()
    taken = written = 0

    async def run(request: kserve_pb2.ModelInferRequest | Undecodable) -> None:
        try:
            responses.put_nowait(await _stream_response(request, answer))
        except BaseException:
            slots.release()
            raise

    async def read() -> None:
        nonlocal taken
        try:
            async for request in requests:
                await slots.acquire()
                taken += 1
                unwritten.count += 1
                task = asyncio.create_task(run(request))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.wait(set(running))
        finally:
            responses.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (response := await responses.get()) is not None:
            # a slot frees once its answer is written, not before: answers a client does not read
            # wait in gRPC's flow control, never in an unbounded queue here
            await context.write(response)
            written += 1
            unwritten.count -= 1
            slots.release()
        await reader  # the stream's own failure (e.g. a refused token), if any
    finally:
        unwritten.count -= taken - written  # answers that will never be written (the call ended)
        for task in (reader, *running):
            task.cancel()


async def _stream_response(
    request: kserve_pb2.ModelInferRequest | Undecodable, answer: Answer
) -> kserve_pb2.ModelStreamInferResponse:
    try:
        if isinstance(request, Undecodable):
            raise InvalidInput("request bytes are not a valid inference.ModelInferRequest message")
        return kserve_pb2.ModelStreamInferResponse(infer_response=await answer(request))
    except MoEServeError as error:
        message = f"{error.status_code.name}: {error.message}"
    except Exception:
        reference = uuid.uuid4().hex[:12]
        logger.exception("unexpected error in ModelStreamInfer (reference %s)", reference)
        message = (
            f"INTERNAL: internal error in ModelStreamInfer; the server log has the details under reference {reference}"
        )
    echo = (
        kserve_pb2.ModelInferResponse()
        if isinstance(request, Undecodable)
        else kserve_pb2.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
    )
    return kserve_pb2.ModelStreamInferResponse(error_message=message, infer_response=echo)
