"""uvicorn's HTTP/1.1 protocol with the limits a service facing slow or idle clients needs.

uvicorn closes a connection that stays idle after a response (its keep-alive timeout), but not
one that never sends a request, nor one that sends its request head a byte at a time: enough
of them (about 20,000 here) use up the file descriptors, and every request after that gets an
empty reply, before any token is checked. Here a connection must deliver each request head
within ``header_timeout_s``, and connections beyond ``max_connections`` are closed at once.
Bodies are paced by the app (:class:`app._Guard`), which can answer 408 and 413.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """An :class:`H11Protocol` class with these limits (uvicorn takes the class as ``http``)."""

    class GuardedH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _cycle_seen: object = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()
                return
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and self.cycle is not self._cycle_seen:
                self._cycle_seen = self.cycle  # a request head arrived in time
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the next request's head is due in time too

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _too_slow(self) -> None:
            self._head_timer = None
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11
