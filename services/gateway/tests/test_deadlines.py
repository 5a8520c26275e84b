"""`Cancel-After` durations, as Replicate's header takes them: seconds, or number-unit parts."""

import pytest

from llamaq_gateway.deps import duration_s
from llamaq_gateway.errors import InvalidParameter


@pytest.mark.parametrize("text, seconds", [("90", 90), ("2.5", 2.5), ("30s", 30), ("5m", 300), ("1h30m", 5400),
                                           ("1.5h", 5400), ("250ms", 0.25), ("1d", 86400), (" 10s ", 10)])
def test_durations(text: str, seconds: float) -> None:
    assert duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "0", "0s", "-5", "5 m", "5x", "m5", "1h 30m", "1e3", "nan", "inf"])
def test_what_is_not_a_duration_is_refused_by_name(text: str) -> None:
    with pytest.raises(InvalidParameter) as refused:
        duration_s(text)
    assert refused.value.param == "Cancel-After"
