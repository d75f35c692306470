"""``python -m tdsteer``: the ``tdsteer`` command."""

from tdsteer.cli import main

raise SystemExit(main())
