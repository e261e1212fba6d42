"""What happens when a log line cannot be written (a full disk under --log-file, a closed
stderr): one line on stderr, once, instead of the standard library's "--- Logging error ---"
traceback for every record. The run goes on; losing the log must never end a session.

`install()` replaces logging.Handler.handleError process-wide (nsvpn's own entry point calls
it; every handler, including the one logging.basicConfig(filename=...) makes, reports through
it). NSVPN_DEBUG=1 keeps the standard behaviour.
"""

from __future__ import annotations

import logging
import os
import sys

_reported = set()  # handlers that already said why they stopped
_original = logging.Handler.handleError


def _handle_error(self: logging.Handler, record: logging.LogRecord) -> None:
    exc = sys.exc_info()[1]
    if id(self) in _reported:
        return
    _reported.add(id(self))
    where = getattr(self, "baseFilename", None) or type(self).__name__
    why = getattr(exc, "strerror", None) or exc or "unknown error"
    msg = f"nsvpn: warning: cannot write the log ({where}: {why}); log lines are lost\n"
    try:
        # straight to fd 2: sys.stderr may be the very stream that failed
        os.write(2, msg.encode(errors="replace"))
    except OSError:
        pass


def install() -> None:
    if os.environ.get("NSVPN_DEBUG"):
        logging.Handler.handleError = _original  # type: ignore[method-assign]
        return
    logging.Handler.handleError = _handle_error  # type: ignore[method-assign]
