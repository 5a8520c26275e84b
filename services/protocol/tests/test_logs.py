import json
import logging

from llamaq_protocol.logs import JsonFormatter, request_id_var


def record(message: str, **extra) -> logging.LogRecord:
    entry = logging.LogRecord("llamaq_test", logging.INFO, __file__, 1, message, (), None)
    entry.__dict__.update(extra)
    return entry


def test_one_json_object_with_the_extras():
    line = JsonFormatter("worker").format(record("job %s done", job_id="abc", request_id="r-1", tokens=3))
    entry = json.loads(line)
    assert entry["service"] == "worker" and entry["level"] == "INFO" and entry["logger"] == "llamaq_test"
    assert entry["job_id"] == "abc" and entry["request_id"] == "r-1" and entry["tokens"] == 3
    assert entry["time"].endswith("+00:00")


def test_the_current_request_id_fills_in_when_none_is_given():
    token = request_id_var.set("from-context")
    try:
        assert json.loads(JsonFormatter("gateway").format(record("x")))["request_id"] == "from-context"
        # An explicit None (a job without a request id) falls back to the context too.
        assert json.loads(JsonFormatter("gateway").format(record("x", request_id=None)))["request_id"] == "from-context"
    finally:
        request_id_var.reset(token)
    assert "request_id" not in json.loads(JsonFormatter("gateway").format(record("x", request_id=None)))


def test_exceptions_and_odd_values_stay_on_one_line():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        entry = record("failed", when=object())
        entry.exc_info = sys.exc_info()
    line = JsonFormatter("gateway").format(entry)
    assert "\n" not in line
    parsed = json.loads(line)
    assert "ValueError: boom" in parsed["exc_info"] and parsed["when"].startswith("<object")


def test_dict_config_gives_another_library_the_same_json_lines(capsys):
    import logging.config

    from llamaq_protocol.logs import logging_dict_config

    logging.config.dictConfig(logging_dict_config("worker", "INFO", "json", "some_library"))
    library = logging.getLogger("some_library.engine")
    library.info("engine %s ready", "core", extra={"job_id": "j1"})
    library.debug("below the level")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["service"] == "worker" and entry["logger"] == "some_library.engine"
    assert entry["message"] == "engine core ready" and entry["job_id"] == "j1"
