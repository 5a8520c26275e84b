"""gunicorn settings, read with `gunicorn -c python:llamaq_gateway.gunicorn_conf`."""

import logging
import os

from llamaq_gateway.settings import get_settings

_settings = get_settings()

bind = f"{os.environ.get('GATEWAY_HOST', '0.0.0.0')}:{_settings.gateway_port}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# uvicorn_worker.UvicornWorker, answering what its HTTP parser refuses in the API's error shape.
worker_class = "llamaq_gateway.http_worker.GatewayWorker"
# Requests may legitimately wait up to the longest wait (300 s, or POST / longer); nginx times out first.
timeout = int(max(_settings.legacy_wait_s, _settings.max_generate_wait_s)) + 60
graceful_timeout = 30
# Longer than nginx's upstream keepalive_timeout (30 s), so nginx closes idle connections first.
keepalive = 75
# nginx sits on another container's address in compose; trust its X-Forwarded-* headers.
forwarded_allow_ips = "*"
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"  # heartbeat files off the container's overlay disk
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level.lower()

logging.basicConfig(level=_settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
