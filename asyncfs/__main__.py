"""`python -m asyncfs` is the same as the `asyncfs` console script."""

from asyncfs.cli.main import main

raise SystemExit(main())
