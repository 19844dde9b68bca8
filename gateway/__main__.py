"""`python -m gateway` and the `phoenix-gateway` command."""

from __future__ import annotations

import signal
import sys


def main() -> int:
    # SIGHUP asks `serve` to reload the config, and its handler comes with the app (or the workers'
    # supervisor) after a second or so of imports: until then the signal would end the process.
    hangup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from gateway.cli import main as run  # noqa: PLC0415 imported once the signal is held off

    return run(hangup=hangup)


if __name__ == "__main__":
    sys.exit(main())
