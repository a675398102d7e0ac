"""The network layer: one ZeroMQ endpoint per peer, serving its snapshot and pulling others'.

Modules, one concept each:

- :mod:`.inbox`      server side: the ROUTER inbox, serving snapshots, link delay, CURVE monitor
- :mod:`.pool`       client side: one DEALER per remote peer, in an LRU pool
- :mod:`.pull`       client side: the pull state machine, batches of pulls, the puller
- :mod:`.transport`  one peer's inbox and puller together (:class:`Transport`)
- :mod:`.directory`  endpoints: the directory of inboxes (inproc, ipc, tcp)
- :mod:`.preflight`  socket and descriptor budgets, checked before launch
- :mod:`.config`     settings, counters, errors
- :mod:`.frames`     sending and receiving whole messages without waiting

The inbox and the puller meet only through :class:`Transport`, which hands both the same
settings and counters; a pull talks to its socket through :class:`~.pool.SocketUser`.
docs/NETWORK.md says how a pull works; docs/WIRE.md is the message format.
"""

from .config import Counters, TransportConfig, TransportError, routing_id
from .directory import IPC_PATH_MAX, free_tcp_ports, ipc_dir, make_directory
from .frames import prepared_frames
from .inbox import Inbox, LinkModel
from .pool import Dealer, SocketPool
from .preflight import Budget, check_fits, preflight, socket_budget
from .pull import Pull, PullBatch, Puller, PullResult
from .transport import Transport

__all__ = [
    "IPC_PATH_MAX", "Budget", "Counters", "check_fits", "Dealer", "Inbox", "LinkModel", "Pull", "PullBatch", "PullResult",
    "Puller", "SocketPool", "Transport", "TransportConfig", "TransportError", "free_tcp_ports", "ipc_dir",
    "make_directory", "preflight", "prepared_frames", "routing_id", "socket_budget",
]
