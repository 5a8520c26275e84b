# rq-dashboard for the compose `ops` profile: a web view of the RQ queue, its registries and the workers.
# Build context: deploy/ops (nothing is copied). docker-compose.yml starts it with the Redis URL and --json
# (llamaq queues jobs with RQ's JSON serializer).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# rq pinned to the worker's major version (rq-dashboard alone would take rq 3); six is imported by
# rq-dashboard 0.9 without being declared.
RUN pip install --no-cache-dir "rq-dashboard==0.9.0" "rq>=2.12,<3" "six==1.17.0" \
    && useradd --uid 10001 --user-group --no-create-home llamaq
USER 10001:10001

EXPOSE 9181
HEALTHCHECK --interval=15s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9181/0/data/queues.json', timeout=4)"]

CMD ["rq-dashboard", "--bind", "0.0.0.0", "--port", "9181", "--json", "--disable-delete"]
