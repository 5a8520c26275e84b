"""One-shot model download (the compose `model-download` service): exits 0 once the files are in place."""

import sys

from llamaq_protocol.logs import configure_logging

from .model_source import resolve_model_dir
from .settings import WorkerSettings


def main() -> int:
    settings = WorkerSettings()
    configure_logging("model-download", settings.log_level, settings.log_format)
    resolve_model_dir(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
