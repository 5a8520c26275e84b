"""The model download logs its progress (no terminal for tqdm in a container): a real folder grown by a fake
snapshot_download, since the real one needs the network."""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from llamaq_worker import download
from llamaq_worker.download_progress import (
    DownloadProgress,
    disable_tqdm_without_terminal,
    folder_usage,
    human_bytes,
)
from llamaq_worker.model_source import resolve_model_dir
from llamaq_worker.settings import WorkerSettings

LOGGER = "llamaq_worker.download_progress"
WORKER_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_tqdm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """TQDM_DISABLE unset, and unset again after the test whatever the code under test put there (a plain
    delenv of an unset variable would restore nothing)."""
    monkeypatch.setenv("TQDM_DISABLE", "")
    monkeypatch.delenv("TQDM_DISABLE")


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
    with DownloadProgress(str(tmp_path), interval_s=0.02):
        _grow(tmp_path, steps=6, chunk=64 * 1024, pause_s=0.05)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert messages[0].startswith("download starting: 2.0 KiB in 1 files already under")
    running = [m for m in messages if m.startswith("downloading: ")]
    assert running, messages
    assert "/s now)" in running[-1]
    assert messages[-1].startswith("download finished after ")
    assert f"{human_bytes(2048 + 6 * 64 * 1024)} in 3 files" in messages[-1]
    assert "(+384.0 KiB)" in messages[-1]


def _bar_disabled_in_a_fresh_process(code: str) -> bool:
    """Runs `code` in a new interpreter (tqdm not yet imported) with stderr in a pipe, as in a container, then
    creates a tqdm bar the way modelscope does and says whether it is disabled."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WORKER_ROOT), env.get("PYTHONPATH")]))
    script = code + "\nfrom tqdm.auto import tqdm\nprint(tqdm(total=1).disable)\n"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "True"


def test_tqdm_bars_are_off_in_a_process_without_terminal() -> None:
    assert not _bar_disabled_in_a_fresh_process("")  # drawn by default: the call below is what turns them off
    imports = "from modelscope import snapshot_download" if importlib.util.find_spec("modelscope") else ""
    # Called before modelscope's import, as resolve_model_dir does: modelscope imports tqdm, which reads
    # TQDM_DISABLE then and never again.
    assert _bar_disabled_in_a_fresh_process(
        f"from llamaq_worker.download_progress import disable_tqdm_without_terminal as off\nassert off()\n{imports}"
    )


def test_tqdm_setting_leaves_a_terminal_and_a_given_value_alone(
    no_tqdm_env: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delitem(sys.modules, "tqdm.std", raising=False)  # as in a process that has not imported it
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not disable_tqdm_without_terminal()
    assert "TQDM_DISABLE" not in os.environ

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv("TQDM_DISABLE", "")
    assert not disable_tqdm_without_terminal()
    assert os.environ["TQDM_DISABLE"] == ""
    monkeypatch.delenv("TQDM_DISABLE")
    assert disable_tqdm_without_terminal()
    assert os.environ["TQDM_DISABLE"] == "1"

    # Too late once tqdm is imported: said so, not pretended.
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setitem(sys.modules, "tqdm.std", types.ModuleType("tqdm.std"))
    assert not disable_tqdm_without_terminal()
    assert "tqdm was imported before TQDM_DISABLE was set" in caplog.text


def test_the_download_service_logs_like_every_other_llamaq_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(download, "configure_logging", lambda *args: calls.append(args))
    monkeypatch.setattr(download, "resolve_model_dir", lambda settings: calls.append(settings.model_id))
    monkeypatch.setenv("LOG_LEVEL", "debug")
    monkeypatch.setenv("LOG_FORMAT", "text")
    monkeypatch.setenv("MODEL_ID", "org/model")
    assert download.main() == 0
    assert calls == [("model-download", "debug", "text"), "org/model"]


def test_a_failed_download_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with pytest.raises(ConnectionError):
        with DownloadProgress(str(tmp_path), interval_s=60):
            raise ConnectionError("network away")
    assert caplog.records[-1].getMessage().startswith("download stopped after ")


def test_resolve_model_dir_reports_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, no_tqdm_env: None
) -> None:
    calls = []
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, as in a container
    monkeypatch.delitem(sys.modules, "tqdm.std", raising=False)  # not imported yet, as in the download service

    def snapshot_download(model_id: str, cache_dir: str) -> str:
        calls.append((model_id, cache_dir, os.environ.get("TQDM_DISABLE")))
        _grow(Path(cache_dir), steps=3, chunk=1024, pause_s=0.01)
        return str(Path(cache_dir) / "org" / "model")

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=snapshot_download))
    caplog.set_level(logging.INFO, logger=LOGGER)
    settings = WorkerSettings(model_id="org/model", model_path=None, model_cache=str(tmp_path))
    assert resolve_model_dir(settings) == str(tmp_path / "org" / "model")
    assert calls == [("org/model", str(tmp_path), "1")]
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert messages[0].startswith("download starting")
    assert messages[-1].startswith("download finished") and "in 2 files" in messages[-1]
