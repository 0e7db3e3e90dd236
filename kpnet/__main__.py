"""``python -m kpnet``: the same command line as ``kpnet``."""

from kpnet.cli import main

if __name__ == "__main__":
    main(prog_name="kpnet")
