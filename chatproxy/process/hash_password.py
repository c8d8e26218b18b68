"""The ``hash-password`` command: a password hash for ``[admin] password_hash``.

``python -m chatproxy hash-password`` reads the password from standard input
(its first line; piped, so that it stays out of the shell history and the
process list) or, on a terminal, asks for it twice without echo, and prints
``scrypt$N$r$p$SALT$HASH`` (:mod:`chatproxy.http.passwords`).
"""

from __future__ import annotations

import getpass
from typing import Callable, TextIO

from chatproxy.http.passwords import hash_password


def read_password(stdin: TextIO, prompt: Callable[[str], str] = getpass.getpass) -> str | None:
    """The password: asked twice on a terminal (None when the two differ), else the first line of ``stdin``."""
    if stdin.isatty():
        first = prompt("Password: ")
        return first if prompt("Again: ") == first else None
    line = stdin.readline()
    return line[:-1].removesuffix("\r") if line.endswith("\n") else line


def main(stdin: TextIO, out: TextIO, err: TextIO) -> int:
    """Print the hash of the password read; returns the exit status (2: no password)."""
    password = read_password(stdin)
    if password is None:
        err.write("chatproxy: the passwords differ\n")
        return 2
    if not password:
        err.write("chatproxy: empty password\n")
        return 2
    out.write(f"{hash_password(password)}\n")
    return 0
