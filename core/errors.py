"""The root of the errors the fleet raises for a request it cannot honour.

A `FleetError`'s message is one sentence for the person who asked (an admin at the CLI, a
client of the API): it says what is wrong and, where there is something to do, what. The CLI
prints it and exits 1; each part subclasses it for its own requests.
"""

from __future__ import annotations


class FleetError(Exception):
    """A request that cannot be honoured; the message says why."""
