"""The server's request and response shapes (pydantic), as OpenAI defines them, plus `sbr`.

Requests are strict (no coercion) but accept unknown OpenAI fields, so stock clients work
unchanged. Bounds known only once the engine is (vocabulary, context) are marked `x-bound` and
filled into the OpenAPI schema by the app; `prepare.py` enforces them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from engine.record import CACHE_FIELDS, TIMING_FIELDS

MAX_TOP_LOGPROBS_CHAT = 20  # OpenAI's limits
MAX_LOGPROBS_COMPLETIONS = 5

_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(v: Any) -> Any:
    # A lone surrogate is a valid JSON escape but not Unicode text; every text field treats it
    # as a UTF-8 decoder treats an invalid byte (U+FFFD), so chat and completions agree.
    return _SURROGATE.sub("\ufffd", v) if isinstance(v, str) else v


def _integral(v: Any) -> Any:
    # JSON Schema counts 3.0 as an integer; strict pydantic would not.
    return int(v) if isinstance(v, float) and v.is_integer() else v


_Integral = BeforeValidator(_integral)  # after the constraints, so the schema shows them
Text = Annotated[str, BeforeValidator(_unicode)]
NonEmptyText = Annotated[str, Field(min_length=1), BeforeValidator(_unicode)]
VOCAB_BOUND = {"x-bound": "vocab"}
CONTEXT_BOUND = {"x-bound": "context"}
MaxTokens = Annotated[int, Field(ge=1, json_schema_extra=CONTEXT_BOUND), _Integral]
OnlyOne = Annotated[int, Field(ge=1, le=1), _Integral]
Seed = Annotated[int, Field(ge=-(2**53), le=2**53), _Integral]  # bounds exact as JSON doubles
TokenId = Annotated[int, Field(ge=0, json_schema_extra=VOCAB_BOUND), _Integral]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class _Strict(BaseModel):
    # Unknown OpenAI fields (frequency_penalty, tools, ...) are accepted and ignored, as most
    # OpenAI-compatible servers do.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None


class SamplingRequest(_Strict):
    model: Text | None = Field(None, description="The served model or one of its aliases.")
    max_tokens: MaxTokens | None = Field(None, description="Tokens to generate at most.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: Seed | None = Field(
        None, description="Sampling seed; when absent one is drawn and reported in `sbr.seed`."
    )
    stop: Text | Annotated[list[Text], Field(max_length=16)] | None = Field(
        None, description="Up to 16 stop strings; the reply ends before the first match."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(
        None,
        description="Session hint: requests with one `user` are one "
        "conversation for the snapshot cache.",
    )
    n: OnlyOne | None = Field(None, description="Only 1 is supported.")
    ignore_eos: bool = Field(False, description="Extension (vLLM): keep generating past EOS.")


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = Field(None, description="Return the log-probability of each token.")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS_CHAT), _Integral] | None = Field(
        None, description="Most likely alternatives per token (needs `logprobs: true`)."
    )


class CompletionRequest(SamplingRequest):
    prompt: (
        NonEmptyText
        | TokenIds
        | Annotated[list[NonEmptyText], Field(min_length=1, max_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=1)]
    ) = Field(..., description="Text or token ids; a batch of exactly one is accepted too.")
    echo: bool = Field(False, description="Prepend the prompt's text to the completion.")
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS_COMPLETIONS), _Integral] | None = Field(
        None, description="Log-probabilities of each token and of this many alternatives."
    )
    best_of: OnlyOne | None = None
    suffix: None = None


# --------------------------------------------------------------------------- responses


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


# The `sbr` object's schema, derived from the engine's per-request record (engine/record.py).
_TIMING_FIELDS: dict[str, Any] = {k: (float, ...) for k in ("queue_s", *TIMING_FIELDS)}
SbrTiming = create_model("SbrTiming", **_TIMING_FIELDS)
_SBR_FIELDS: dict[str, Any] = {
    **{k: (int, ...) for k in CACHE_FIELDS},
    "generated_tokens": (int, ...),
    "logits_sha256": (str, ...),
    "session": (str | None, ...),
    "seed": (int, ...),
    "timing": (SbrTiming, ...),
}
if TYPE_CHECKING:
    SbrInfo = BaseModel
else:
    SbrInfo = create_model(
        "SbrInfo",
        __doc__="The cache at work: what was matched, restored, replayed and newly computed, "
        "and the sampling seed (drawn when the request set none: replay it to repeat).",
        **_SBR_FIELDS)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sbr: SbrInfo


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    sbr: SbrInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    model: str
    queue_depth: int
    busy: bool
