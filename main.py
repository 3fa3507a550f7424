"""``python main.py ...`` from the repository root, as in the seed's examples."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from wanda.cli.main import main  # noqa: E402

if __name__ == "__main__":
    main()
