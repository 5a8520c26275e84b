"""The model download logs its progress (no terminal for tqdm in a container): a real folder grown by a fake
snapshot_download, since the real one needs the network."""

from __future__ import annotations

import logging
import os
import sys
import time
import types
from pathlib import Path

import pytest

from llamaq_worker.download_progress import DownloadProgress, folder_usage, human_bytes
from llamaq_worker.model_source import resolve_model_dir
from llamaq_worker.settings import WorkerSettings

LOGGER = "llamaq_worker.download_progress"


def _grow(folder: Path, steps: int, chunk: int, pause_s: float) -> None:
    """What a download does: a partial file grows, then is renamed into place."""
    target = folder / "org" / "model"
    target.mkdir(parents=True, exist_ok=True)
    part = target / "model.safetensors.incomplete"
    for _ in range(steps):
        with part.open("ab") as f:
            f.write(b"\0" * chunk)
        time.sleep(pause_s)
    part.rename(target / "model.safetensors")
    (target / "config.json").write_text("{}")


def test_folder_usage_counts_nested_and_partial_files(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "w.safetensors.incomplete").write_bytes(b"x" * 1000)
    (tmp_path / "a" / "config.json").write_bytes(b"y" * 24)
    os.symlink(tmp_path / "a", tmp_path / "link")  # not followed: nothing counted twice
    assert folder_usage(str(tmp_path)) == (2, 1024)
    assert folder_usage(str(tmp_path / "missing")) == (0, 0)


def test_human_bytes() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(16 * 1024**3) == "16.0 GiB"


def test_progress_is_logged_while_the_folder_grows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "already.bin").write_bytes(b"z" * 2048)  # a resumed download starts from what is there
    caplog.set_level(logging.INFO, logger=LOGGER)
    with DownloadProgress(str(tmp_path), interval_s=0.02, quiet_tqdm=False):
        _grow(tmp_path, steps=6, chunk=64 * 1024, pause_s=0.05)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert messages[0].startswith("download starting: 2.0 KiB in 1 files already under")
    running = [m for m in messages if m.startswith("downloading: ")]
    assert running, messages
    assert "/s now)" in running[-1]
    assert messages[-1].startswith("download finished after ")
    assert f"{human_bytes(2048 + 6 * 64 * 1024)} in 3 files" in messages[-1]
    assert "(+384.0 KiB)" in messages[-1]


def test_tqdm_bars_are_off_only_during_the_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with DownloadProgress(str(tmp_path), interval_s=60, quiet_tqdm=True):
        assert os.environ["TQDM_DISABLE"] == "1"
    assert "TQDM_DISABLE" not in os.environ

    monkeypatch.setenv("TQDM_DISABLE", "0")
    with DownloadProgress(str(tmp_path), interval_s=60, quiet_tqdm=True):
        assert os.environ["TQDM_DISABLE"] == "1"
    assert os.environ["TQDM_DISABLE"] == "0"


def test_a_failed_download_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with pytest.raises(ConnectionError):
        with DownloadProgress(str(tmp_path), interval_s=60, quiet_tqdm=False):
            raise ConnectionError("network away")
    assert caplog.records[-1].getMessage().startswith("download stopped after ")


def test_resolve_model_dir_reports_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def snapshot_download(model_id: str, cache_dir: str) -> str:
        calls.append((model_id, cache_dir))
        _grow(Path(cache_dir), steps=3, chunk=1024, pause_s=0.01)
        return str(Path(cache_dir) / "org" / "model")

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=snapshot_download))
    caplog.set_level(logging.INFO, logger=LOGGER)
    settings = WorkerSettings(model_id="org/model", model_path=None, model_cache=str(tmp_path))
    assert resolve_model_dir(settings) == str(tmp_path / "org" / "model")
    assert calls == [("org/model", str(tmp_path))]
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert messages[0].startswith("download starting")
    assert messages[-1].startswith("download finished") and "in 2 files" in messages[-1]
