"""`python -m facemoe_jax.aot --config C --topology T [--json F]`: the command line (see
__init__.py)."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Nothing runs: the host CPU backend traces and compiles; an attached accelerator stays free.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from facemoe_jax.aot.report import format_report, report  # noqa: E402
from facemoe_jax.core import cli  # noqa: E402

# configs/ lives beside the package: the --config files import `configs.common`.
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _PROJECT_ROOT not in sys.path:
    sys.path.insert(0, _PROJECT_ROOT)


def define_flags() -> dict:
    """The command's flags (defined when it runs, not on import: main.py defines --config too)."""
    return {
        "config": config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py)."),
        "topology": flags.DEFINE_string("topology", None, 'TPU topology, e.g. "v5p:2x2x1".'),
        "embed_batch": flags.DEFINE_integer("embed_batch", 0, "Embedding batch (0: train batch)."),
        "json": flags.DEFINE_string("json", None, "Also write the report to this JSON file."),
        "search": flags.DEFINE_bool(
            "search", True, "When it does not fit, search a mesh that does."
        ),
    }


def main(argv, options: dict) -> dict:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config, topology = options["config"].value, options["topology"].value
    if config is None or not topology:
        cli.fail("both --config and --topology are required")
    try:
        result = report(config, topology, options["embed_batch"].value, options["search"].value)
    except ValueError as e:
        cli.fail(str(e.args[0]) if e.args else repr(e))
    print(format_report(result), flush=True)
    if options["json"].value:
        with open(options["json"].value, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    options = define_flags()
    main(cli.parse_flags(sys.argv), options)
