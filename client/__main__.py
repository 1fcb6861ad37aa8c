"""`python -m cllm`: the same as the `cllm` command."""
import sys

from cllm.cli import main

sys.argv[0] = "cllm"
raise SystemExit(main())
