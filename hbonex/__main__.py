"""``python -m hbonex``: same as the ``hbonex`` console script."""

from hbonex.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
