"""Who is asking: keys from API_KEYS and API_KEYS_FILE, and the rate-limit headers' wording."""

import hashlib

import pytest

from llamaq_gateway.callers import OPEN_ACCOUNT, Keyring, duration, open_caller, rate_headers


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_a_keys_file_names_weights_and_limits_keys_it_never_holds(tmp_path):
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(f'[[key]]\nname = "team-a"\nsha256 = "{sha("sk-a")}"\nweight = 2\nrpm = 60\n'
                         f'over_limit = "queue"\n')
    ring = Keyring.load(["sk-plain"], str(keys_file))
    team = ring.caller("sk-a")
    assert (team.client, team.account, team.weight, team.limits.rpm, team.limits.over_limit) == (
        "team-a", "team-a", 2.0, 60, "queue")
    assert team.owner == sha("sk-a")[:32]  # the same owner as API_KEYS gives the same key: jobs stay visible
    plain = ring.caller("sk-plain")
    assert plain.client == f"key-{sha('sk-plain')[:8]}" and plain.limits.rpm == 0 and plain.weight == 1
    assert ring.caller("sk-nope") is None
    assert ring.names == {"team-a", plain.client}


@pytest.mark.parametrize("body", [
    '[[key]]\nname = "a"\nsha256 = "{s}"\n[[key]]\nname = "a"\nsha256 = "{s}"\n',  # a name twice
    '[[key]]\nname = "anonymous"\nsha256 = "{s}"\n',  # the open API's account
    '[[key]]\nname = "a"\nsha256 = "not-hex"\n',
    '[[key]]\nname = "a b"\nsha256 = "{s}"\n',  # not a label
    '[[key]]\nname = "a"\nsha256 = "{s}"\nrpm = -1\n',
    '[[key]]\nname = "a"\nsha256 = "{s}"\nsurprise = 1\n',
    '[[key]\n',  # not TOML
])
def test_a_bad_keys_file_stops_the_gateway_with_a_reason(tmp_path, body):
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(body.replace("{s}", sha("k")))
    with pytest.raises(ValueError, match="API_KEYS_FILE"):
        Keyring.load([], str(keys_file))


def test_without_keys_the_api_is_open_and_callers_are_their_addresses(tmp_path):
    assert Keyring.load([], "").open
    with pytest.raises(ValueError, match="API_KEYS_FILE"):
        Keyring.load([], str(tmp_path / "missing.toml"))
    caller = open_caller("203.0.113.7")
    assert (caller.client, caller.account, caller.list_owner) == ("addr:203.0.113.7", OPEN_ACCOUNT,
                                                                    "public@203.0.113.7")


def test_openai_rate_limit_headers():
    assert duration(20) == "20ms" and duration(1500) == "1.5s" and duration(360_000) == "6m0s"
    assert rate_headers(0, 0, 0, 0, 0, 0) == {}
    headers = rate_headers(60, 59, 1000, 0, 0, 0)
    assert headers == {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
                       "x-ratelimit-reset-requests": "1s"}
