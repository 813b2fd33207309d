"""LLM Engine event simulators (seed 1): `llm-speaker` feeds a live talk's transcript to the Recall
webhook, `llm-participant` asks the event assistant questions, `llm-chat` streams OpenAI-compatible
chat completions and measures TTFT, inter-token latency, TPOT, tokens/s and goodput."""

from simulators.llm_engine.chat import ChatOptions, ChatSimulator
from simulators.llm_engine.participant import ParticipantOptions, ParticipantSimulator
from simulators.llm_engine.speaker import SpeakerOptions, SpeakerSimulator

__all__ = [
    "ChatOptions",
    "ChatSimulator",
    "ParticipantOptions",
    "ParticipantSimulator",
    "SpeakerOptions",
    "SpeakerSimulator",
]
