"""``python -m convo``: the same as the ``convo`` command."""

from ._cli import main

main()
