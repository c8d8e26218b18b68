"""What a master puts in the environment of its worker processes (``workers = N``).

A process with :data:`WORKER_ENV` set is worker k of a master; without it,
it is a single proxy process or the master itself.
"""

from __future__ import annotations

#: Set in a worker process's environment: its number (1..N).
WORKER_ENV = "CHATPROXY_WORKER"
#: Set in a worker process's environment: the master's private directory.
WORKER_DIR_ENV = "CHATPROXY_WORKER_DIR"
#: Set in a worker process's environment: the master's pid.
MASTER_PID_ENV = "CHATPROXY_MASTER_PID"
