"""The access log's two formats, in memory: what a record of a refused request carries."""

from __future__ import annotations

import json

from attrs import evolve

from chatproxy.proxy.accesslog import AccessRecord, format_combined, format_json

RECORD = AccessRecord(client="198.51.100.7", method="GET", target="/chat?q=x", version="1.1", status=403,
                      bytes_sent=48, duration=0.0012, route="chat", upstream="", referer="", user_agent="curl/8",
                      host="chat.example.com", started=0.0)


def test_filter_notes_in_both_formats():
    """A filter's note (the waf's anomaly score and rule ids) ends the combined line as
    ``filter.NAME="note"`` and is the ``filters`` object of the JSON line; a record
    without notes has neither."""
    noted = evolve(RECORD, notes=(("waf", "anomaly_score=10 rules=942100,949110"),))
    assert format_combined(noted).endswith(' route=chat upstream=- filter.waf="anomaly_score=10 rules=942100,949110"')
    assert json.loads(format_json(noted))["filters"] == {"waf": "anomaly_score=10 rules=942100,949110"}
    assert "filter." not in format_combined(RECORD) and "filters" not in json.loads(format_json(RECORD))
