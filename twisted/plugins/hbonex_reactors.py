"""
Reactors hbonex adds to ``twistd --reactor``: ``uvloop`` (hbonex/uvloopreactor.py) and
``hbonex-epoll`` (hbonex/epollreactor.py).
"""

from twisted.application.reactors import Reactor

uvloop = Reactor("uvloop", "hbonex.uvloopreactor",
                 "Twisted's asyncio reactor on a uvloop event loop (needs uvloop).")
hbonex_epoll = Reactor("hbonex-epoll", "hbonex.epollreactor",
                       "Twisted's epoll reactor without the per-event log context.")
