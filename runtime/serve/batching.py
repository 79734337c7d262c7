"""Dynamic batching: concurrent text searches gathered into one encoder call, off the event loop.

A request's queries wait in a queue; the worker takes the oldest request, waits at most
``max_wait_ms`` for more to arrive (or until the queries it expects are there: those of the last
batch, whose clients send again, and those already waiting, up to ``max_batch_queries``), and
answers the gathered requests with one :meth:`Retriever.search_text` call per search setting
(MR on/off, nprobe/ef), in a worker thread. Results are cut back to each request's ``top_k``: a
shorter list is a prefix of a longer one, with MR too (MR reranks the same candidates; see
:mod:`galr.runtime.retriever`). The queue is bounded: past ``max_queued_queries`` a request is
refused at once (:class:`~galr.errors.BusyError`, HTTP 503) instead of growing memory. A request
whose client went away is dropped before it is computed.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from galr.errors import BusyError


@dataclass(frozen=True)
class SearchCall:
    """One request's text search: its queries, how many hits each, MR on/off, the search settings
    (``nprobe``/``ef``, a place filter) as sorted ``(name, value)`` pairs."""

    queries: list[str]
    top_k: int
    rerank: bool
    search: tuple[tuple[str, Any], ...] = ()


@dataclass
class _Request:
    call: SearchCall
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def queries(self) -> list[str]:
        return self.call.queries


#: ``run(queries, top_k, rerank, search_params) -> results`` in query order (a blocking call).
RunBatch = Callable[[list[str], int, bool, dict[str, Any]], list[Any]]


def answer_together(run: RunBatch, calls: Sequence[SearchCall],
                    on_batch: Callable[[int], None] = lambda _: None) -> list[Any]:
    """Answer several requests' searches with one ``run`` per search setting (a blocking call).

    Calls with the same MR switch and search settings share one encoder batch; each call gets its
    own ``top_k`` back (a shorter list is a prefix of a longer one, MR included). A failing ``run``
    fails only the calls of its group: their entry is the exception, the others' their results.

    Returns:
        One entry per call, in order: its list of results, or the exception its group raised.
    """
    groups: dict[tuple[bool, tuple], list[int]] = {}
    for position, call in enumerate(calls):
        groups.setdefault((call.rerank, call.search), []).append(position)
    answers: list[Any] = [None] * len(calls)
    for (rerank, search), members in groups.items():
        queries = [query for position in members for query in calls[position].queries]
        on_batch(len(queries))
        try:
            results = run(queries, max(calls[p].top_k for p in members), rerank, dict(search))
        except Exception as exc:  # noqa: BLE001 - handed to each call of the group
            for position in members:
                answers[position] = exc
            continue
        start = 0
        for position in members:
            call = calls[position]
            answers[position] = [result.truncated(call.top_k) for result in results[start:start + len(call.queries)]]
            start += len(call.queries)
    return answers


class QueryBatcher:
    """Gathers text searches into batches (see the module docstring).

    Args:
        run: the blocking search over a batch (runs in one worker thread).
        max_batch_queries: queries per encoder call at most (a larger request runs alone).
        max_wait_ms: the longest the oldest request waits for company.
        max_queued_queries: queries waiting or running at most.
        on_batch: called with each batch's query count (metrics).
    """

    def __init__(self, run: RunBatch, *, max_batch_queries: int, max_wait_ms: float, max_queued_queries: int,
                 on_batch: Callable[[int], None] = lambda _: None) -> None:
        self._run = run
        self._max_batch, self._max_wait = max_batch_queries, max_wait_ms / 1e3
        self._max_queued, self._on_batch = max_queued_queries, on_batch
        self._queue: list[_Request] = []
        self._queued = 0
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="galr-search")
        self._last_answered = 0.0
        # Queries expected in the next batch: those just answered (their clients send again) plus those
        # already waiting; at most a full batch.
        self._expected = 1

    @property
    def queued_queries(self) -> int:
        """Queries waiting or being computed."""
        return self._queued

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._arrived = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    def run_blocking(self, function: Callable[..., Any], *args: Any) -> "asyncio.Future[Any]":
        """Run another blocking call (embeddings, image search) on the same worker thread."""
        return asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def search(self, queries: Sequence[str], top_k: int, rerank: bool, search: dict[str, Any]) -> list[Any]:
        """The results of ``queries``, computed in a batch with other requests.

        Raises:
            BusyError: the queue is full (the caller should retry later).
        """
        if self._queued + len(queries) > self._max_queued:
            raise BusyError(f"the service is busy ({self._queued} queries waiting); retry shortly")
        request = _Request(SearchCall(list(queries), top_k, rerank, tuple(sorted(search.items()))),
                           asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self._queued += len(request.queries)
        self._arrived.set()
        try:
            return await request.future
        finally:
            if not request.future.done():  # the caller gave up (timeout, disconnect): never computed
                request.future.cancel()

    def _take(self) -> list[_Request]:
        """The oldest live requests whose queries fit in one batch (at least one request)."""
        taken, count = [], 0
        while self._queue:
            request = self._queue[0]
            if request.future.done():  # cancelled while waiting
                self._queue.pop(0)
                self._queued -= len(request.queries)
                continue
            if taken and count + len(request.queries) > self._max_batch:
                break
            taken.append(self._queue.pop(0))
            count += len(request.queries)
        return taken

    def _waiting(self) -> int:
        return sum(len(r.queries) for r in self._queue if not r.future.done())

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._queue:
                # The wait counts from the later of the oldest arrival and the end of the last batch: the
                # clients just answered get max_wait to send their next request and join this batch, so
                # under steady load the batch holds every client (one full batch, not two half ones:
                # the text encoder reads its weights once per batch, whatever its size). It ends as soon
                # as the clients expected back are there: a lone client never waits at all.
                deadline = max(self._queue[0].arrived, self._last_answered) + self._max_wait
                while self._waiting() < self._expected and (remaining := deadline - time.perf_counter()) > 0:
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                        self._arrived.clear()
                    except asyncio.TimeoutError:
                        break
                batch = self._take()
                if batch:
                    await self._answer(loop, batch)

    async def _answer(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        try:
            answers = await loop.run_in_executor(self._executor, answer_together, self._run,
                                                 [request.call for request in batch], self._on_batch)
            for request, answer in zip(batch, answers):
                if request.future.done():
                    continue
                if isinstance(answer, BaseException):
                    request.future.set_exception(answer)
                else:
                    request.future.set_result(answer)
        finally:
            self._queued -= sum(len(request.queries) for request in batch)
            # Let the answered requests' handlers run (they build and send the responses on this loop)
            # before the next batch's wait starts: the wait is the clients' time to send again.
            await asyncio.sleep(0)
            self._last_answered = time.perf_counter()
            answered = sum(len(request.queries) for request in batch)
            self._expected = max(1, min(self._max_batch, answered + self._waiting()))


__all__ = ["QueryBatcher", "RunBatch", "SearchCall", "answer_together"]
