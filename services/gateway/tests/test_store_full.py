"""Redis at its maxmemory (noeviction, as compose and k8s run it) refuses writes: a request that would write gets
the one error shape, 503 `store_full` with Retry-After, never a 500, and nothing is half written."""

from fastapi.testclient import TestClient

from llamaq_gateway.app import create_app
from llamaq_gateway.settings import GatewaySettings

LINE = (b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions",'
        b'"body":{"model":"m","messages":[{"role":"user","content":"hi"}]}}\n')


def test_a_full_redis_is_a_503_that_writes_nothing(store, redis_url):
    with TestClient(create_app(GatewaySettings(redis_url=redis_url))) as client:
        store.config_set("maxmemory", "1")
        try:
            refused = client.post("/v1/files", files={"file": ("a.jsonl", LINE)}, data={"purpose": "batch"})
        finally:
            store.config_set("maxmemory", "0")
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["type"] == "store_full"
        assert int(refused.headers["retry-after"]) > 0
        assert not store.keys("llamaq:file:*")
        # Room again: the same upload goes through.
        assert client.post("/v1/files", files={"file": ("a.jsonl", LINE)}, data={"purpose": "batch"}).status_code == 200


def test_each_client_keeps_at_most_its_storage_quota_of_files(store, redis_url):
    settings = GatewaySettings(redis_url=redis_url, max_file_storage_bytes=2 * len(LINE))
    with TestClient(create_app(settings)) as client:
        def upload(address: str):
            return client.post("/v1/files", files={"file": ("a.jsonl", LINE)}, data={"purpose": "batch"},
                               headers={"X-Real-IP": address})

        first, second = upload("10.0.0.1"), upload("10.0.0.1")
        assert first.status_code == second.status_code == 200
        refused = upload("10.0.0.1")
        assert refused.status_code == 413 and refused.json()["error"]["type"] == "storage_quota_exceeded"
        assert "MAX_FILE_STORAGE_BYTES" in refused.json()["error"]["message"]
        assert upload("10.0.0.2").status_code == 200  # another client's quota is its own
        assert client.delete(f"/v1/files/{first.json()['id']}", headers={"X-Real-IP": "10.0.0.1"}).status_code == 200
        assert upload("10.0.0.1").status_code == 200
