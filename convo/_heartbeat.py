"""The heartbeat of a send: renewing its claim while the API call is alive.

A send claims its conversation for ``send_lease`` seconds. While the call is
alive the heartbeat renews the claim every third of the lease, so a long call
(SDK retries included) keeps other senders out and a dead sender's claim
lapses within one lease. At the store's ``send_timeout`` it closes the stream
in flight, once.

:class:`Heartbeat` holds that policy, written once; :class:`ThreadHeartbeat`
runs it on a thread for the sync store, and ``_aio.TaskHeartbeat`` on an
asyncio task for the async store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Heartbeat", "ThreadHeartbeat"]

logger = logging.getLogger("convo.api")


class Heartbeat:
    """When to renew a claim and when the send's deadline falls; what to do then.

    ``renew()`` renews the claim and returns False if someone else cleared it.
    ``deadline`` is in monotonic seconds (None: none). Subclasses call
    :meth:`tick` whenever :meth:`seconds_to_wait` has passed, until stopped.
    """

    def __init__(
        self,
        renew: Callable[[], bool],
        *,
        lease: float,
        deadline: float | None,
        name: str,
    ) -> None:
        self._renew = renew
        self._interval = lease / 3
        self._deadline = deadline
        self._next_renewal = time.monotonic() + self._interval
        self.name = name
        self.on_deadline: Callable[[], None] | None = None
        self.timed_out = False

    def seconds_to_wait(self) -> float:
        """Until the next renewal or the deadline, whichever comes first."""
        wake = self._next_renewal
        if self._deadline is not None and not self.timed_out:
            wake = min(wake, self._deadline)
        return max(0.0, wake - time.monotonic())

    def tick(self) -> None:
        """Close the stream at the deadline; renew the claim when it is due."""
        deadline = self._deadline
        if deadline is not None and not self.timed_out and time.monotonic() >= deadline:
            self.timed_out = True
            callback = self.on_deadline
            if callback is not None:
                try:
                    callback()
                except Exception:
                    logger.debug("closing a timed-out stream failed", exc_info=True)
        if time.monotonic() >= self._next_renewal:
            self._next_renewal = time.monotonic() + self._interval
            try:
                if not self._renew():
                    logger.warning("%s: the send's claim was cleared by someone else", self.name)
            except Exception as exc:
                logger.warning("%s: could not renew the send's claim: %s", self.name, exc)

    def watch(self, close: Callable[[], None]) -> None:
        """Call ``close`` at the deadline (at once if it has passed already)."""
        self.on_deadline = close
        if self.timed_out:
            close()

    def stop(self) -> None:  # pragma: no cover - every runner overrides it
        raise NotImplementedError


class ThreadHeartbeat(Heartbeat):
    """The heartbeat on a daemon thread (the sync store)."""

    def __init__(
        self,
        renew: Callable[[], bool],
        *,
        lease: float,
        deadline: float | None,
        name: str,
    ) -> None:
        super().__init__(renew, lease=lease, deadline=deadline, name=name)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"convo-claim-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.seconds_to_wait()):
            self.tick()

    def stop(self) -> None:
        self._stopped.set()
