"""``fitsim app``: start the dashboard (``streamlit run app/streamlit_app.py``) with any further arguments
passed on to streamlit (``fitsim app --server.port 8600``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

SCRIPT = Path(__file__).resolve().with_name("streamlit_app.py")


def command(argv: Sequence[str] = ()) -> list[str]:
    """The command line that runs the dashboard with this interpreter's streamlit."""
    return [sys.executable, "-m", "streamlit", "run", str(SCRIPT), *argv]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if importlib.util.find_spec("streamlit") is None or importlib.util.find_spec("plotly") is None:
        print('fitsim app: error: the dashboard needs the app extra: pip install -e ".[app]"', file=sys.stderr)
        return 2
    try:
        return subprocess.call(command(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
