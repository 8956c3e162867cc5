"""``python -m lympho_mil``: the ``lympho-mil`` command."""

import sys

from lympho_mil.cli import main

sys.argv[0] = "lympho-mil"  # the usage lines name the command, not __main__.py
main()
