"""``python -m cellspec`` is the ``cellspec`` command."""

from cellspec.cli import main

raise SystemExit(main())
