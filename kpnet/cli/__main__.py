"""``python -m kpnet.cli``: the same as the ``kpnet`` command."""

from kpnet.cli import main

main()
