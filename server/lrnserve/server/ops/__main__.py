"""``python -m lrnserve.server.ops [--build-all]``: build the fused CPU kernel ahead of time."""

from .native import main

main()
