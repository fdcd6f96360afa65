"""parity: a multi-turn stream on which policies choose different snapshots.

Conversations interleaved with one-shot pressure on a small pool, so each policy restores from
different positions; exact replay means tokens and logits digests must still match bitwise.
"""

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


class Parity(Scenario):
    name = "parity"
    summary = "same request stream under two policies: tokens and logits digests must match"
    PARAMS = {
        "convs": Param(int, "conversations", 1),
        "turns": Param(int, "turns per conversation", 1),
        "system_tokens": Param(int, "system prompt tokens", 0),
        "first_tokens": Param(int, "tokens of each conversation's first user message", 1),
        **TURN_PARAMS,
        "pressure": Param(int, "one-shot requests after each round of turns", 0),
        "pressure_tokens": Param(int, "prompt tokens of each one-shot request", 1),
        "pressure_reply_tokens": Param(int, "tokens generated per one-shot request", 1),
    }

    def __init__(self, params: dict[str, Any], seed: int = 0) -> None:
        super().__init__(params, seed)
        self.text = TextGen(f"parity/{seed}")
        self.rng = random.Random(f"parity/turns/{seed}")

    def expected_requests(self) -> int:
        return self.p["turns"] * (self.p["convs"] + self.p["pressure"])

    def waves(self) -> Iterator[list[Step]]:
        p = self.p
        convs = []
        for c in range(p["convs"]):
            conv = self.conversation(f"par-{c}")
            if p["system_tokens"]:
                conv.add("system", self.text.prose(p["system_tokens"]))
            conv.add("user", self.text.prose(p["first_tokens"]))
            convs.append(conv)
        for t in range(p["turns"]):
            wave = []
            for c, conv in enumerate(convs):
                if t:
                    add_agentic_turn(conv, self.rng, p, self.text)
                wave.append(
                    Step(
                        conv.request(p["reply_tokens"]),
                        {"phase": "prompt", "conv": c, "round": t},
                        conv.add_reply,
                    )
                )
            yield wave
            pressure = []
            for j in range(p["pressure"]):
                one = self.conversation(f"par-oneshot-{t}-{j}")
                one.add("user", self.text.prose(p["pressure_tokens"]))
                pressure.append(
                    Step(
                        one.request(p["pressure_reply_tokens"]),
                        {"phase": "pressure", "conv": None, "round": t},
                    )
                )
            if pressure:
                yield pressure
