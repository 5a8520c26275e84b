"""Webhooks: a job's `webhook` URL told of its `webhook_events`, at least once, signed per Standard Webhooks.

The job-state scripts (records.NOTIFY_LUA) queue a delivery, "<job id>:<event>", in the webhooks-due sorted set in
the same atomic step that changes the job, so nothing that ends a job (a worker, a cancel, the sweep) can skip it
and no decoding step waits on a receiver. Every gateway process runs a deliverer: it leases the deliveries that
are due (pushes their due time past the attempt, in one script, so no other process takes them meanwhile), sends
each, and on a 2xx removes it; on anything else it is due again after an exponential backoff, until
WEBHOOK_RETRY_FOR_S has passed since its first attempt. A deliverer that dies mid-attempt leaves its lease to
expire and another process sends the delivery again, so a receiver may see one delivery twice (the same
`webhook-id`: dedupe on it), never none while it keeps failing for less than WEBHOOK_RETRY_FOR_S.

The first time a deliverer picks a delivery up it copies what it sends (the URL and the job object as it is then)
into the delivery's own key (keys.webhook_payload), kept a little longer than WEBHOOK_RETRY_FOR_S: every attempt
sends that copy, so retries go on for WEBHOOK_RETRY_FOR_S although the job record expires RESULT_TTL_S after the
job ends. WEBHOOK_TIMEOUT_S bounds a whole attempt (resolving, connecting, sending, the answer's last byte), and
at most MAX_ANSWER_BYTES of the answer are read before the connection is closed: a slow or endless receiver
cannot hold a delivery slot.

Each attempt resolves the host again and refuses (drops the delivery) if any address it resolves to is loopback,
link-local, private or otherwise not public, unless WEBHOOK_ALLOW_PRIVATE; it connects to the very address it
checked (the host name kept for `Host` and TLS), so a DNS answer that changes between check and connect cannot
point it inward. Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import socket
import time
import uuid
from urllib.parse import urlsplit

import httpx

from llamaq_protocol import keys
from llamaq_protocol.records import job_from_record

from .errors import InvalidRequest
from .settings import GatewaySettings
from .webhook_signing import secret_key, signature

logger = logging.getLogger(__name__)

EVENTS = ("completed", "failed", "canceled", "started")
DEFAULT_EVENTS = ("completed", "failed", "canceled")
MAX_BACKOFF_S = 3600.0
# Deliveries one process sends at once, and leases per round.
CONCURRENCY = 16
POLL_S = 0.2
# How much of a receiver's answer an attempt reads at most (only its status counts), then it closes the connection.
MAX_ANSWER_BYTES = 64 * 1024

# KEYS: webhooks due. ARGV: now, lease until, most to take. The deliveries due now, each leased until ARGV[2].
LEASE_SCRIPT = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], member) end
return due
"""


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _host_and_port(url: str) -> tuple[str, int]:
    """The host and port `url` names; InvalidRequest (param `webhook`) for a port out of range or no host."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number or is out of range (99999)
    except ValueError as exc:
        raise InvalidRequest(f"webhook: not a usable URL: {exc}", param="webhook") from exc
    if port == 0:
        raise InvalidRequest("webhook: not a usable URL: port 0", param="webhook")
    if not parts.hostname:
        raise InvalidRequest("webhook: not a usable URL: it names no host", param="webhook")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def resolve(url: str, allow_private: bool) -> str:
    """The address to connect to for `url`, checked; InvalidRequest (param `webhook`) when it may not be used."""
    hostname, port = _host_and_port(url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:  # ValueError: a NUL in the host, say
        raise InvalidRequest(f"webhook: cannot resolve {hostname!r}: {exc}", param="webhook") from exc
    addresses = [info[4][0] for info in infos]
    if not allow_private and not all(_public(a) for a in addresses):
        raise InvalidRequest(
            f"webhook: {hostname!r} resolves to a loopback, link-local or private address", param="webhook"
        )
    return addresses[0]


def record_fields(url: str, events: list[str]) -> dict[str, str]:
    """What a job record keeps of its webhook (NOTIFY_LUA reads `webhook_events`)."""
    return {"webhook": url, "webhook_events": ",".join(dict.fromkeys(events))}


async def check_submission(settings: GatewaySettings, url: str | None) -> None:
    """At submit: refused (400) when webhooks are not set up here or the URL may not be used."""
    if url is None:
        return
    if settings.webhook_secret is None:
        raise InvalidRequest("webhook: this deployment has no WEBHOOK_SECRET, so it sends no webhooks",
                             param="webhook")
    await resolve(url, settings.webhook_allow_private)


class WebhookDeliverer:
    def __init__(self, settings: GatewaySettings, aio):
        self.settings = settings
        self.aio = aio
        self.key = secret_key(settings.webhook_secret.get_secret_value())
        self._lease = aio.register_script(LEASE_SCRIPT)
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._tasks: set[asyncio.Task] = set()
        # Direct connections only (no proxy from the environment): the address checked is the one reached.
        self.http = httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False)
        self.name = uuid.uuid4().hex[:8]

    async def run_forever(self) -> None:
        try:
            while True:
                try:
                    taken = await self.deliver_due()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis away, say: the leases lapse and the deliveries come round again
                    logger.warning("webhook round failed: %s", exc)
                    taken = 0
                if not taken:
                    await asyncio.sleep(POLL_S)
        finally:
            for task in self._tasks:
                task.cancel()
            await self.http.aclose()

    async def deliver_due(self) -> int:
        """Leases what is due (as many as there are free slots) and starts sending each; how many it took."""
        free = CONCURRENCY - len(self._tasks)
        if free <= 0:
            return 0
        current = time.time()
        lease_until = current + self.settings.webhook_timeout_s + 30
        members = await self._lease(keys=[keys.WEBHOOKS_DUE], args=[current, lease_until, free])
        for member in members:
            task = asyncio.create_task(self._deliver(member.decode()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(members)

    async def _deliver(self, member: str) -> None:
        async with self._slots:
            job_id, _, event = member.rpartition(":")
            payload = await self._payload(member, job_id)
            if payload is None:
                await self._forget(member)  # the job expired before its first attempt, or never had a webhook
                return
            url = payload["url"]
            msg_id = f"msg_{job_id}_{event}"
            body = payload["body"].encode()
            try:
                outcome = await self._send(url, msg_id, event, body)
            except InvalidRequest as exc:
                logger.warning("webhook %s for job %s dropped: %s", event, job_id, exc, extra={"job_id": job_id})
                await self._forget(member)
                return
            if outcome is None:
                await self._forget(member)
                logger.info("webhook %s for job %s delivered", event, job_id, extra={"job_id": job_id})
            else:
                await self._retry_later(member, job_id, outcome, float(payload["first"]))

    def _payload_ttl_s(self) -> int:
        # Past the last retry WEBHOOK_RETRY_FOR_S allows: its backoff, its attempt and its lease.
        return math.ceil(self.settings.webhook_retry_for_s + MAX_BACKOFF_S + self.settings.webhook_timeout_s + 60)

    async def _payload(self, member: str, job_id: str) -> dict | None:
        """The delivery's own copy of what it sends ({url, body, first}), taken from the job record the first time
        it is picked up; None when there is nothing to send (no record, no webhook, or the copy outlived)."""
        key = keys.webhook_payload(member)
        stored = await self.aio.get(key)
        if stored is None:
            first = time.time()
            if await self.aio.hexists(keys.WEBHOOK_ATTEMPTS, member):
                # Attempted before: its copy expired (WEBHOOK_RETRY_FOR_S is over), unless an older gateway, which
                # kept no copy but the first attempt's time, made those attempts.
                earlier = await self.aio.hget(keys.WEBHOOK_ATTEMPTS, f"{member}:first")
                if earlier is None:
                    return None
                first = float(earlier)
            record = await self.aio.hgetall(keys.job(job_id))
            url = (record or {}).get(b"webhook")
            if not url:
                return None
            payload = {
                "url": url.decode(),
                "body": json.dumps(job_from_record(job_id, record).public(), separators=(",", ":")),
                "first": first,
            }
            if await self.aio.set(key, json.dumps(payload), nx=True, ex=self._payload_ttl_s()):
                return payload
            stored = await self.aio.get(key)  # another deliverer's lease ran out while it was taking its copy
            if stored is None:
                return None
        return json.loads(stored)

    async def _send(self, url: str, msg_id: str, event: str, body: bytes) -> str | None:
        """One attempt, WEBHOOK_TIMEOUT_S at most from resolving to the answer's last byte; None when the receiver
        answered 2xx, else what went wrong."""
        timeout_s = self.settings.webhook_timeout_s
        try:
            return await asyncio.wait_for(self._attempt(url, msg_id, event, body), timeout_s)
        except asyncio.TimeoutError:
            return f"no whole answer within WEBHOOK_TIMEOUT_S ({timeout_s:g} s)"

    async def _attempt(self, url: str, msg_id: str, event: str, body: bytes) -> str | None:
        parts = urlsplit(url)
        address = await resolve(url, self.settings.webhook_allow_private)
        host = f"[{address}]" if ":" in address else address
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        target = parts._replace(netloc=netloc).geturl()
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "host": parts.netloc.rpartition("@")[2],
            "user-agent": "llamaq-webhooks",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(self.key, msg_id, timestamp, body),
            "llamaq-event": event,
        }
        extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
        try:
            async with self.http.stream("POST", target, content=body, headers=headers,
                                        extensions=extensions) as response:
                read = 0  # raw bytes, not decoded: a compressed answer cannot grow past the cap either
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read >= MAX_ANSWER_BYTES:
                        break  # leaving the block closes the connection, unread
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    async def _retry_later(self, member: str, job_id: str, why: str, first: float) -> None:
        current = time.time()
        attempts = await self.aio.hincrby(keys.WEBHOOK_ATTEMPTS, member, 1)
        if current - first >= self.settings.webhook_retry_for_s:
            logger.warning("webhook for job %s given up after %d attempts: %s", job_id, attempts, why,
                           extra={"job_id": job_id})
            await self._forget(member)
            return
        delay = min(self.settings.webhook_backoff_s * 2 ** (attempts - 1), MAX_BACKOFF_S)
        logger.info("webhook for job %s failed (%s); attempt %d again in %.1f s", job_id, why, attempts + 1, delay,
                    extra={"job_id": job_id})
        await self.aio.zadd(keys.WEBHOOKS_DUE, {member: current + delay}, xx=True)

    async def _forget(self, member: str) -> None:
        async with self.aio.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.WEBHOOKS_DUE, member)
            pipe.hdel(keys.WEBHOOK_ATTEMPTS, member, f"{member}:first")  # ":first": kept there by older versions
            pipe.delete(keys.webhook_payload(member))
            await pipe.execute()
