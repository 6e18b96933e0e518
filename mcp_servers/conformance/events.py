"""A bounded in-memory event store, so a client can resume an SSE stream with Last-Event-ID."""

from __future__ import annotations

import itertools
from collections import deque

from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp_types import JSONRPCMessage


class MemoryEventStore(EventStore):
    def __init__(self, capacity: int = 10_000):
        self._events: deque[tuple[EventId, StreamId, JSONRPCMessage | None]] = deque(maxlen=capacity)
        self._ids = itertools.count(1)

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        event_id = str(next(self._ids))
        self._events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        stream_id = next((stream for event, stream, _ in self._events if event == last_event_id), None)
        if stream_id is None:
            return None  # unknown, or already evicted
        after = int(last_event_id)
        for event, stream, message in list(self._events):
            # Priming events carry no message: they only give the client an id to resume from.
            if stream == stream_id and int(event) > after and message is not None:
                await send_callback(EventMessage(message, event))
        return stream_id
