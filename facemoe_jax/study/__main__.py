"""`python -m facemoe_jax.study`: runs the command line of cli.py."""

import os
import sys

if __name__ == "__main__":
    from facemoe_jax.core import huge_pages

    huge_pages.restart_with_huge_pages()  # see facemoe_jax/core/huge_pages.py
    # After the restart: the new process would import everything again.
    from facemoe_jax.study import cli

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(cli.main())
