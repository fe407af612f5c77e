"""
The command line: the ``hbonex`` tool and the twistd taps (``hbone-client``, ``hbone-server``).
"""
