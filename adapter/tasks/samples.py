"""Sample data shared by the task modules: the ids the OpenAPI examples use (the demo seeds
records under them), and text for the answers a double's model gives."""

from __future__ import annotations

EXAMPLE_LEAD_ID = "65f1c0ffee0000000000a001"
EXAMPLE_DEAL_ID = "65f1c0ffee0000000000d001"

# The reasoning of the OpenAPI examples: long enough to meet the personas' guidance.
EXAMPLE_REASONING = ("Maria Silva is VP of Sales at Acme Logistics, a Series C company, so she has budget and authority. "
                     "She came through a referral and asked for a demo, which shows a clear need. ") * 2


def filler(subject: str, words: int) -> str:
    """Plausible reasoning of at least `words` words about `subject` (a double's model)."""
    sentence = (f"The assessment of {subject} weighs the available evidence on budget, authority, need "
                "and timing, and notes where the record is silent so the team can close those gaps quickly. ")
    text = ""
    while len(text.split()) < words:
        text += sentence
    return text.strip()
