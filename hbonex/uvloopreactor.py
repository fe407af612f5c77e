"""
``twistd --reactor uvloop``: Twisted's asyncio reactor driving a uvloop event loop.

uvloop is optional (``pip install -e '.[uvloop]'``); twistd reports the ImportError below as
"The specified reactor cannot be used" and exits, so asking for it without it is never silent.
The loop must exist before the reactor does, hence a reactor plugin
(twisted/plugins/hbonex_reactors.py) rather than an event-loop policy set later.
"""

from __future__ import annotations

import asyncio

INSTALL_HINT = "the uvloop reactor needs uvloop: pip install -e '.[uvloop]'"


def install() -> None:
    try:
        import uvloop
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    from twisted.internet import asyncioreactor

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)
