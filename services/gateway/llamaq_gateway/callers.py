"""Who is asking: the caller's API key (or, with the API open, address), its fair-share weight and its limits.

Keys come from `API_KEYS` (comma-separated keys; each gets a name `key-<8 hex>`, weight 1, no limits) and
`API_KEYS_FILE`, a TOML file that holds no key, only its SHA-256:

    [[key]]
    name = "team-a"            # the key's name in /metrics, /v1/usage and the logs
    sha256 = "9f86d0...15b0"   # sha256 of the key, hex (`printf %s "$KEY" | sha256sum`)
    weight = 2                 # its share of the engine against other busy keys (default 1)
    rpm = 600                  # requests per minute (0 or absent: no limit)
    tpm = 200000               # tokens per minute: prompt + max tokens reserved at admission, settled at the end
    max_concurrent = 8         # jobs running at once; more wait in the queue
    max_queued = 100           # jobs waiting at once; more are refused (429)
    over_limit = "refuse"      # over rpm/tpm: "refuse" (429 + Retry-After) or "queue" (run behind everyone's work)

A caller's jobs belong to its `owner` (a digest of its key, as before; every job of the open API belongs to one
owner); it is scheduled and limited as its `client` (the key's name, or `addr:<address>` with the API open), and
counted in /metrics as its `account` (the key's name, or "anonymous": addresses are not a bounded label).
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PUBLIC_OWNER = "public"
OPEN_ACCOUNT = "anonymous"
KEY_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class KeyLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)
    max_concurrent: int = Field(default=0, ge=0)
    max_queued: int = Field(default=0, ge=0)
    over_limit: Literal["refuse", "queue"] = "refuse"


class KeyEntry(KeyLimits):
    name: str = Field(pattern=KEY_NAME.pattern)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weight: float = Field(default=1.0, gt=0, le=1000)


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: list[KeyEntry] = []


@dataclass
class Caller:
    owner: str
    client: str
    account: str
    weight: float = 1.0
    limits: KeyLimits = field(default_factory=KeyLimits)
    # Whose lists (GET /v1/jobs, /v1/files, /v1/batches) it sees: its owner's; with the API open, those it made from
    # its own address (anyone may read a job whose id they hold, but nobody lists everyone's).
    list_owner: str = PUBLIC_OWNER
    # OpenAI's x-ratelimit-* headers, once an admission has read the caller's buckets (app.RequestContext adds them).
    rate_headers: dict[str, str] = field(default_factory=dict)

    @property
    def keyed(self) -> bool:
        return self.owner != PUBLIC_OWNER


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Keyring:
    """Every accepted key, by its SHA-256 (looked up by the digest of what was presented, so no comparison of the
    key itself can leak its prefix)."""

    def __init__(self, entries: list[KeyEntry]):
        self.by_digest: dict[str, KeyEntry] = {}
        names: set[str] = set()
        for entry in entries:
            if entry.name in names or entry.name == OPEN_ACCOUNT:
                raise ValueError(f"API_KEYS_FILE: key name {entry.name!r} is used twice or reserved")
            names.add(entry.name)
            self.by_digest[entry.sha256] = entry
        self.names = frozenset(names)

    @classmethod
    def load(cls, plain_keys: list[str], keys_file: str = "") -> Keyring:
        entries = [KeyEntry(name=f"key-{key_digest(k)[:8]}", sha256=key_digest(k)) for k in plain_keys]
        if keys_file:
            try:
                parsed = KeysFile.model_validate(tomllib.loads(Path(keys_file).read_text()))
            except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
                raise ValueError(f"API_KEYS_FILE {keys_file}: {exc}") from exc
            entries += parsed.key
        return cls(entries)

    @property
    def open(self) -> bool:
        return not self.by_digest

    def caller(self, presented: str) -> Caller | None:
        """The caller holding this key, or None when it is no key of ours."""
        digest = key_digest(presented)
        entry = self.by_digest.get(digest)
        if entry is None:
            return None
        owner = digest[:32]
        limits = KeyLimits(**entry.model_dump(include=set(KeyLimits.model_fields)))
        return Caller(owner=owner, client=entry.name, account=entry.name, weight=entry.weight, limits=limits,
                      list_owner=owner)


def open_caller(address: str) -> Caller:
    """A caller of the open API (no keys configured), known by its address."""
    return Caller(owner=PUBLIC_OWNER, client=f"addr:{address}", account=OPEN_ACCOUNT,
                  list_owner=f"{PUBLIC_OWNER}@{address}")


def system_caller(owner: str) -> Caller:
    """A caller known by its owner alone."""
    return Caller(owner=owner, client=owner, account=OPEN_ACCOUNT if owner == PUBLIC_OWNER else owner,
                  list_owner=owner)


def batch_caller(fields: dict[str, str]) -> Caller:
    """The creator of a batch (its record's fields), for the driver that queues its lines later: its client and
    weight, without rate limits (a batch waits for room in the batch queue instead)."""
    if "client" not in fields:  # a batch created before callers were recorded
        return system_caller(fields["owner"])
    return Caller(owner=fields["owner"], client=fields["client"], account=fields["account"],
                  weight=float(fields.get("weight") or 1), list_owner=fields.get("list_owner") or fields["owner"])


def rate_headers(rpm: int, req_left: int, req_reset_ms: int, tpm: int, tok_left: int, tok_reset_ms: int) -> dict:
    """OpenAI's rate-limit headers for the limits a key has (the `openai` SDKs and LiteLLM read them)."""
    headers = {}
    if rpm:
        headers |= {"x-ratelimit-limit-requests": str(rpm), "x-ratelimit-remaining-requests": str(req_left),
                    "x-ratelimit-reset-requests": duration(req_reset_ms)}
    if tpm:
        headers |= {"x-ratelimit-limit-tokens": str(tpm), "x-ratelimit-remaining-tokens": str(tok_left),
                    "x-ratelimit-reset-tokens": duration(tok_reset_ms)}
    return headers


def bucket_state(bucket: dict[bytes, bytes], limits: KeyLimits) -> dict[str, tuple[int, int]]:
    """What is left of a key's rate limits now, and in how many ms each is full again: its buckets (keys.rate_bucket,
    as records.FAIR_LUA's bucket_level reads them) refilled since their last write."""
    now_ms = time.time() * 1000
    state = {}
    for kind, name, cap in (("req", "requests", limits.rpm), ("tok", "tokens", limits.tpm)):
        if cap:
            level = float(bucket.get(kind.encode(), cap))
            level = min(cap, level + (now_ms - float(bucket.get(f"{kind}_at".encode(), now_ms))) * cap / 60000)
            state[name] = (max(0, int(level)), max(0, math.ceil((cap - level) * 60000 / cap)))
    return state


def state_headers(bucket: dict[bytes, bytes], limits: KeyLimits) -> dict[str, str]:
    """OpenAI's rate-limit headers from a key's buckets as they are now (the answers that admit nothing)."""
    state = bucket_state(bucket, limits)
    req_left, req_reset = state.get("requests", (0, 0))
    tok_left, tok_reset = state.get("tokens", (0, 0))
    return rate_headers(limits.rpm, req_left, req_reset, limits.tpm, tok_left, tok_reset)


def duration(ms: int) -> str:
    """A wait as OpenAI writes it in x-ratelimit-reset-*: "6m0s", "1.5s", "20ms"."""
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"
