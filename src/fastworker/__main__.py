"""`python -m fastworker`."""

from fastworker.cli import main

raise SystemExit(main())
