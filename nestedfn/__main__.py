"""``python -m nestedfn``: the same command line as ``nestedfn``."""

from nestedfn.cli import entry

if __name__ == "__main__":
    entry()
