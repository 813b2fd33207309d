"""Secret-looking profile values are hidden in reports and the panel; token counts are not."""

from __future__ import annotations

from harness.report.html import redact


def test_secret_keys_are_hidden_and_counts_are_kept() -> None:
    profile = {
        "targets": {"llm": {"webhook_token": "abc", "url": "http://user:pw@127.0.0.1:1/x?api_key=zz"}},
        "groups": {
            "chat": {
                "options": {"max_tokens": 24, "api_key": "sk-1", "headers": {"Authorization": "Bearer t"}}
            },
            "agents": {"options": {"wallet_key": "k", "keyword": "shoes", "output_tokens": 5}},
        },
    }
    safe = redact(profile)
    assert safe["targets"]["llm"]["webhook_token"] == "***"
    assert "pw" not in safe["targets"]["llm"]["url"] and "zz" not in safe["targets"]["llm"]["url"]
    chat = safe["groups"]["chat"]["options"]
    assert chat["max_tokens"] == 24 and chat["api_key"] == "***" and chat["headers"]["Authorization"] == "***"
    agents = safe["groups"]["agents"]["options"]
    assert agents == {"wallet_key": "***", "keyword": "shoes", "output_tokens": 5}
