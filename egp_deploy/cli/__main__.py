"""``python -m egp_deploy.cli STAGE [ARGS...]`` dispatches to ``egp-STAGE``."""

import importlib
import sys

from egp_deploy.cli import STAGES


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:
        print(f"usage: python -m egp_deploy.cli {{{','.join(STAGES)}}} [ARGS...]", file=sys.stderr)
        sys.exit(2)
    stage = sys.argv.pop(1)
    importlib.import_module(f"egp_deploy.cli.{stage}").main()


if __name__ == "__main__":
    main()
