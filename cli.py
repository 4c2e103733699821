"""Root entry point so that `python cli.py preprocess ...` works from a checkout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from codicodec_flow.commands.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
