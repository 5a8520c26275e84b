"""One-shot model download (the compose `model-download` service): exits 0 once the files are in place."""

import logging
import sys

from .model_source import resolve_model_dir
from .settings import WorkerSettings


def main() -> int:
    settings = WorkerSettings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    resolve_model_dir(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
