"""round-robin: N conversations advanced in turn for R rounds (where tail-pin regressed)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from sbrbench.scenarios.base import (
    TURN_PARAMS,
    Param,
    Scenario,
    Step,
    TextGen,
    add_agentic_turn,
)


class RoundRobin(Scenario):
    name = "round-robin"
    summary = "N conversations advanced in turn for R rounds"
    PARAMS = {
        "convs": Param(int, "conversations", 1),
        "rounds": Param(int, "turns per conversation", 1),
        "system_tokens": Param(int, "system prompt tokens", 0),
        "shared_system": Param(bool, "all conversations share one system prompt"),
        "first_tokens": Param(int, "tokens of each conversation's first user message", 1),
        **TURN_PARAMS,
    }

    def __init__(self, params: dict[str, Any], seed: int = 0) -> None:
        super().__init__(params, seed)
        self.text = TextGen(f"round-robin/{seed}")
        self.rng = random.Random(f"round-robin/turns/{seed}")

    def expected_requests(self) -> int:
        return self.p["convs"] * self.p["rounds"]

    def waves(self) -> Iterator[list[Step]]:
        p = self.p
        shared = self.text.prose(p["system_tokens"]) if p["system_tokens"] else ""
        convs = []
        for c in range(p["convs"]):
            conv = self.conversation(f"rr-{c}")
            if p["system_tokens"]:
                conv.add(
                    "system", shared if p["shared_system"] else self.text.prose(p["system_tokens"])
                )
            conv.add("user", self.text.prose(p["first_tokens"]))
            convs.append(conv)
        for rnd in range(p["rounds"]):
            wave = []
            for c, conv in enumerate(convs):
                if rnd:
                    add_agentic_turn(conv, self.rng, p, self.text)
                wave.append(
                    Step(
                        conv.request(p["reply_tokens"]),
                        {"phase": "round", "conv": c, "round": rnd},
                        conv.add_reply,
                    )
                )
            yield wave
