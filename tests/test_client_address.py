"""Who the client is behind a load balancer: TRUSTED_PROXIES.

nginx takes the client's address from X-Forwarded-For only when the connection comes from a trusted proxy
(nginx/nginx.conf's realip settings, the trusted list from TRUSTED_PROXIES); from anywhere else the header is
ignored. Checked through the real stack (nginx, gunicorn, Redis, a worker with `ENGINE=paced`: no model, and a
job that runs long enough to hold streams open), where 127.0.0.1 is the trusted proxy and 127.0.0.9 an untrusted
client: nginx's access log, and the gateway's per-address cap on open streams (MAX_STREAMS_PER_CLIENT=1). Then
nginx alone, without a stack: what it sends the gateway, its per-address rate limit, and the default (trust
nobody).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from conftest import running_stack, stack_environment
from nginx_local import NGINX_CONF, find_nginx, free_port, render_nginx_conf, run_nginx

PROXY = "127.0.0.1"  # the trusted proxy: loopback's usual source address
STRANGER = "127.0.0.9"  # another loopback address, not trusted
CLIENT = "203.0.113.7"  # documentation addresses (RFC 5737) as the forwarded clients
OTHER = "198.51.100.23"


def _client(base_url: str, source: str = PROXY) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=30, transport=httpx.HTTPTransport(local_address=source))


def _logged_addr(edge, request_id: str) -> str:
    """remote_addr of nginx's access-log line for the request with this X-Request-ID."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in edge.read_access_log().splitlines():
            entry = json.loads(line)
            if entry["request_id"] == request_id:
                return entry["remote_addr"]
        time.sleep(0.05)
    pytest.fail(f"no access-log line for {request_id}")


def _nginx_or_fail() -> None:
    if find_nginx() is None:
        pytest.fail("nginx not found: run `make tools`", pytrace=False)


# --- through the real stack ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxied_stack():
    # One gateway process: the stream cap is counted per process.
    env = stack_environment(ENGINE="paced", PACED_TOKENS_PER_S="10", MAX_BATCH="4", WEB_CONCURRENCY="1",
                            MAX_STREAMS_PER_CLIENT="1", TRUSTED_PROXIES=PROXY)
    with running_stack("llamaq-client-address-", env) as running:
        yield running


@pytest.mark.parametrize(("source", "forwarded", "seen"), [
    (PROXY, CLIENT, CLIENT),
    # A chain: the address the trusted proxy appended (the rightmost) is the client; what the client wrote before it
    # is its own claim.
    (PROXY, f"{OTHER}, {CLIENT}", CLIENT),
    # Trusted proxies in the chain are skipped (real_ip_recursive): a proxy behind a proxy.
    (PROXY, f"{CLIENT}, {PROXY}", CLIENT),
    (PROXY, None, PROXY),
    # Not from a trusted proxy: the header is ignored, whatever it says.
    (STRANGER, CLIENT, STRANGER),
    (STRANGER, f"{CLIENT}, {PROXY}", STRANGER),
])
def test_nginx_logs_the_client_a_trusted_proxy_forwards(
    proxied_stack, source: str, forwarded: str | None, seen: str
) -> None:
    request_id = uuid.uuid4().hex
    headers = {"X-Request-ID": request_id} | ({"X-Forwarded-For": forwarded} if forwarded else {})
    with _client(proxied_stack.url, source) as client:
        assert client.get("/healthz", headers=headers).status_code == 200
    assert _logged_addr(proxied_stack.nginx, request_id) == seen


def test_the_gateways_per_address_cap_counts_forwarded_clients_apart(proxied_stack) -> None:
    with _client(proxied_stack.url) as proxy, _client(proxied_stack.url, STRANGER) as stranger:
        # 40 s of tokens: the streams stay open for the whole test.
        submitted = proxy.post("/v1/jobs", json={"prompt": "hold", "max_new_tokens": 400})
        assert submitted.status_code == 202, submitted.text
        job = submitted.json()["id"]
        url = f"/v1/jobs/{job}/events"

        def forwarded(client: str) -> dict[str, str]:
            return {"X-Forwarded-For": client}

        try:
            with proxy.stream("GET", url, headers=forwarded(CLIENT)) as first, \
                    proxy.stream("GET", url, headers=forwarded(OTHER)) as second, \
                    stranger.stream("GET", url, headers=forwarded(CLIENT)) as third:
                # Two clients behind the proxy, and the stranger as itself: one stream each, under a cap of one.
                assert [first.status_code, second.status_code, third.status_code] == [200, 200, 200]
                # The same forwarded client again: over its cap.
                again = proxy.get(url, headers=forwarded(CLIENT))
                assert again.status_code == 429, again.text
                assert again.json()["error"]["type"] == "too_many_streams"
                # The stranger cannot dodge its cap by naming someone else.
                dodge = stranger.get(url, headers=forwarded("192.0.2.44"))
                assert dodge.status_code == 429, dodge.text
                # The proxy's own requests are the proxy's.
                with proxy.stream("GET", url) as own:
                    assert own.status_code == 200
        finally:
            proxy.delete(f"/v1/jobs/{job}")


# --- nginx alone --------------------------------------------------------------------------------


class _Upstream(BaseHTTPRequestHandler):
    """Stands in for the gateway: records the headers nginx sends."""

    protocol_version = "HTTP/1.1"
    seen: dict[str, dict[str, str]] = {}

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.seen[self.headers["X-Request-ID"]] = {k.lower(): v for k, v in self.headers.items()}
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")


@pytest.fixture(scope="module")
def upstream_port():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("trusted", "source", "forwarded", "client"), [
    (PROXY, PROXY, f"{OTHER}, {CLIENT}", CLIENT),
    (PROXY, STRANGER, CLIENT, STRANGER),
    # The default: nobody is trusted, so not even loopback names the client.
    ("", PROXY, CLIENT, PROXY),
    ("10.0.0.0/8, 127.0.0.0/24", STRANGER, CLIENT, CLIENT),
])
def test_the_gateway_gets_only_the_client_nginx_decided_on(
    tmp_path: Path, upstream_port: int, trusted: str, source: str, forwarded: str, client: str
) -> None:
    """X-Real-IP and X-Forwarded-For both carry the one address: the gateway trusts what nginx sends, so a client's
    own X-Forwarded-For must not reach it."""
    _nginx_or_fail()
    request_id = uuid.uuid4().hex
    with run_nginx(tmp_path, None, upstream_port, trusted_proxies=trusted) as edge, _client(edge.url, source) as http:
        reply = http.get("/v1/models", headers={"X-Forwarded-For": forwarded, "X-Request-ID": request_id})
        assert reply.status_code == 200
        assert _logged_addr(edge, request_id) == client
    seen = _Upstream.seen[request_id]
    assert (seen["x-real-ip"], seen["x-forwarded-for"]) == (client, client)


def test_the_rate_limit_is_per_forwarded_client(tmp_path: Path) -> None:
    _nginx_or_fail()
    port = free_port()
    conf = render_nginx_conf(NGINX_CONF.read_text(), port, free_port(), trusted_proxies=PROXY)
    conf = conf.replace("rate=100r/s", "rate=1r/m").replace("burst=200", "burst=1")
    with run_nginx(tmp_path, port, 0, conf_text=conf) as edge, _client(edge.url) as proxy, \
            _client(edge.url, STRANGER) as stranger:

        def statuses(http: httpx.Client, forwarded: str, count: int) -> list[int]:
            return [http.get("/healthz", headers={"X-Forwarded-For": forwarded}).status_code for _ in range(count)]

        # No gateway behind this nginx: 502 is a request that passed the limit.
        assert 429 in statuses(proxy, CLIENT, 3)
        # Another client behind the same proxy has its own allowance.
        assert statuses(proxy, OTHER, 1) == [502]
        # An untrusted client is limited as itself, whatever address it names each time.
        assert 429 in [statuses(stranger, f"192.0.2.{i}", 1)[0] for i in range(1, 4)]
