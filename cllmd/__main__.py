"""`python -m cllmd`: the same as the `cllmd` command."""
import sys

from cllmd.cli import main

sys.argv[0] = "cllmd"
raise SystemExit(main())
