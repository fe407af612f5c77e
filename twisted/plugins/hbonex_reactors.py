"""
Reactors hbonex adds to ``twistd --reactor``: ``uvloop`` (hbonex/uvloopreactor.py).
"""

from twisted.application.reactors import Reactor

uvloop = Reactor("uvloop", "hbonex.uvloopreactor",
                 "Twisted's asyncio reactor on a uvloop event loop (needs uvloop).")
