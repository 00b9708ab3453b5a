"""`make chaos`: the chaos suite (tests/chaos/runner.py). See docs/reliability.md.

    CHAOS_MINUTES=10 CHAOS_SEED=42 .venv/bin/python scripts/chaos.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from chaos.runner import main  # noqa: E402 (after the path set-up above)

if __name__ == "__main__":
    sys.exit(main())
