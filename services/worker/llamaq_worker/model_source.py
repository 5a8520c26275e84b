"""Where the weights come from: a local MODEL_PATH, or modelscope's snapshot_download as the original did."""

import logging
import os

from .download_progress import DownloadProgress, disable_tqdm_without_terminal
from .settings import WorkerSettings

logger = logging.getLogger(__name__)


def resolve_model_dir(settings: WorkerSettings) -> str:
    if settings.model_path:
        if not os.path.isfile(os.path.join(settings.model_path, "config.json")):
            raise FileNotFoundError(f"MODEL_PATH={settings.model_path} has no config.json")
        return settings.model_path
    # Before modelscope imports tqdm, which reads TQDM_DISABLE only then.
    disable_tqdm_without_terminal()
    from modelscope import snapshot_download  # imported late: only the download path needs it

    logger.info("fetching %s into %s (resumes a partial download)", settings.model_id, settings.model_cache)
    # modelscope resumes each partial file with HTTP Range requests and locks files against a second downloader;
    # progress goes to the log every 30 s instead of its bars (no terminal for them in a container).
    with DownloadProgress(settings.model_cache):
        model_dir = snapshot_download(settings.model_id, cache_dir=settings.model_cache)
    logger.info("model files ready in %s", model_dir)
    return model_dir
