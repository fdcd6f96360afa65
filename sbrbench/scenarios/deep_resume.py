"""deep-resume: one deep agentic conversation, idle under one-shot pressure, then resumed.

The regime where a recency x hits policy ("forecast") strands the idle conversation: its deep
snapshots look cold next to fresh one-shot traffic, so the resume replays from far back.
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
    turn_plan_lengths,
)


class DeepResume(Scenario):
    name = "deep-resume"
    summary = "one deep conversation idles under one-shot pressure, then resumes (cycles)"
    PARAMS = {
        "depth": Param(int, "grow the conversation until its prompt reaches this many tokens", 1),
        "system_tokens": Param(int, "system prompt tokens", 0),
        **TURN_PARAMS,
        "pressure": Param(int, "one-shot requests sent while the conversation idles", 0),
        "pressure_tokens": Param(int, "prompt tokens of each one-shot request", 1),
        "pressure_reply_tokens": Param(int, "tokens generated per one-shot request", 1),
        "resume_tokens": Param(int, "new user tokens sent with each resume", 1),
        "cycles": Param(int, "pressure + resume repetitions", 1),
    }

    def __init__(self, params: dict[str, Any], seed: int = 0) -> None:
        super().__init__(params, seed)
        self.text = TextGen(f"deep-resume/{seed}")
        self.rng = random.Random(f"deep-resume/turns/{seed}")

    def expected_requests(self) -> int:
        p = self.p
        rng = random.Random(f"deep-resume/turns/{self.seed}")
        depth, turns = p["system_tokens"] + 16, 0
        while depth < p["depth"]:
            depth += turn_plan_lengths(rng, p)[1] + p["reply_tokens"] + 30
            turns += 1
        return turns + p["cycles"] * (p["pressure"] + 1)

    def waves(self) -> Iterator[list[Step]]:
        p = self.p
        conv = self.conversation("deep-0")
        if p["system_tokens"]:
            conv.add("system", self.text.prose(p["system_tokens"]))
        turn = 0
        while conv.depth < p["depth"]:
            add_agentic_turn(conv, self.rng, p, self.text)
            yield [
                Step(
                    conv.request(p["reply_tokens"]),
                    {"phase": "build", "conv": 0, "cycle": None, "turn": turn},
                    conv.add_reply,
                )
            ]
            turn += 1
        for cycle in range(p["cycles"]):
            yield [self._one_shot(cycle, j) for j in range(p["pressure"])]
            conv.add("user", self.text.prose(p["resume_tokens"]))
            yield [
                Step(
                    conv.request(p["reply_tokens"]),
                    {"phase": "resume", "conv": 0, "cycle": cycle, "turn": turn},
                    conv.add_reply,
                )
            ]
            turn += 1

    def _one_shot(self, cycle: int, j: int) -> Step:
        one = self.conversation(f"oneshot-{cycle}-{j}")
        one.add("user", self.text.prose(self.p["pressure_tokens"]))
        return Step(
            one.request(self.p["pressure_reply_tokens"]),
            {"phase": "pressure", "conv": None, "cycle": cycle},
        )
