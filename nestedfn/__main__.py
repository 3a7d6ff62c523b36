"""``python -m nestedfn``: the same command line as ``nestedfn``."""

from nestedfn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
