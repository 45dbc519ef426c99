"""``python -m qhx_edge`` runs the command line."""

from qhx_edge.cli import main

main()
