"""gunicorn settings, read with `gunicorn -c python:llamaq_gateway.gunicorn_conf`."""

import os
import shutil
import tempfile

from llamaq_gateway.settings import get_settings

_settings = get_settings()

bind = f"{_settings.gateway_host}:{_settings.gateway_port}"
workers = _settings.web_concurrency
# uvicorn_worker.UvicornWorker, answering what its HTTP parser refuses in the API's error shape.
worker_class = "llamaq_gateway.http_worker.GatewayWorker"
# Requests may legitimately wait up to the longest wait (300 s, or POST / longer); nginx times out first.
timeout = int(max(_settings.legacy_wait_s, _settings.max_generate_wait_s)) + 60
graceful_timeout = 30
# Longer than nginx's upstream keepalive_timeout (30 s), so nginx closes idle connections first.
keepalive = 75
# Connections nginx has opened that a busy process has not accepted yet (thousands of streams opening at once);
# gunicorn's 2048 filled on a loaded host (nginx then answered 504). The kernel caps it at net.core.somaxconn,
# 4096 by default.
backlog = 4096
# nginx sits on another container's address in compose; trust its X-Forwarded-* headers.
forwarded_allow_ips = "*"
# Heartbeat files (and the metrics below) in memory, off the container's overlay disk.
_shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
if _shm:
    worker_tmp_dir = _shm
# The gateway logs each request itself (with its request id, as JSON); gunicorn's own lines go the same way.
accesslog = None
errorlog = "-"
loglevel = _settings.log_level.lower()
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"llamaq": {"()": "llamaq_protocol.logs.formatter", "service": "gateway",
                              "log_format": _settings.log_format}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "llamaq", "stream": "ext://sys.stderr"}},
    "root": {"level": _settings.log_level.upper(), "handlers": ["stderr"]},
    # uvicorn's loggers take these two loggers' handlers in each worker (uvicorn_worker), so set them here.
    "loggers": {
        "gunicorn.error": {"level": _settings.log_level.upper(), "handlers": ["stderr"], "propagate": False},
        "gunicorn.access": {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
    },
}

# Metrics from every gunicorn worker process are summed at scrape time (prometheus-client multiprocess mode):
# each process writes its values into this folder, emptied at every start so no dead process is counted.
# Set here, in the master, before any worker imports prometheus_client. Named after the master's pid, so gateways
# sharing a host never share it (in a container the pid, and so the folder, is the same at every start).
_given_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
_metrics_dir = _given_metrics_dir or os.path.join(
    _shm or tempfile.gettempdir(), f"llamaq-gateway-metrics-{os.getpid()}"
)
shutil.rmtree(_metrics_dir, ignore_errors=True)
os.makedirs(_metrics_dir)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    # The folder this master made goes with it; not one it was given, nor one a re-exec'd master (USR2) now uses.
    if not _given_metrics_dir and not server.reexec_pid:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
