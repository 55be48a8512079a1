"""Request bodies of the OpenAI-compatible API (pydantic).

Every OpenAI parameter (and the vLLM extensions lmforge knows) is a field here, so that each one is
either honoured, refused with a 400 that names it, or ignored on purpose (docs/serving.md lists which).
Fields not named here are ignored, as vLLM does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from ..engine.sampling import REPETITION_PENALTY_MAX, SEED_MAX, SEED_MIN, TEMPERATURE_MAX


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _refuse(message: str) -> PydanticCustomError:
    """A 400 whose `param` is the field being validated (the error's location)."""
    return PydanticCustomError("unsupported", message)


# Structured-output parameters of other servers; lmforge takes a JSON schema through response_format
# (or vLLM's guided_json), and these are refused rather than dropped.
_OTHER_GRAMMARS = ("guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
                   "guided_whitespace_pattern", "structural_tag", "grammar", "json_schema")


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaSpec(_Body):
    name: str = "response"
    description: str | None = None
    # "schema" shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaSpec | None = None


class _Sampling(_Body):
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=TEMPERATURE_MAX)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0 disables (vLLM uses -1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=REPETITION_PENALTY_MAX)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    user: str | None = None  # ignored (OpenAI's abuse monitoring)
    min_tokens: int = Field(default=0, ge=0)  # vLLM's: no end-of-turn or stop string before this many tokens
    guided_json: dict[str, Any] | str | None = None  # vLLM's spelling of a json_schema response_format
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    structural_tag: Any = None
    grammar: Any = None  # llama.cpp's GBNF
    json_schema: Any = None  # llama.cpp's top-level schema
    num_beams: Any = None  # refused above 1 (below), as is vLLM's use_beam_search
    use_beam_search: Any = None

    @field_validator("num_beams", "use_beam_search")
    @classmethod
    def _beams(cls, v: Any, info: Any) -> Any:
        if (v not in (None, False)) if info.field_name == "use_beam_search" else v not in (None, 1):
            raise _refuse("beam search is not served (the server schedules decoding step by step); it runs "
                          "in `lmforge generate --num-beams` and the Python API's num_beams")
        return v

    @field_validator(*_OTHER_GRAMMARS)
    @classmethod
    def _other_grammar(cls, v: Any, info: Any) -> Any:
        if v is not None:
            raise _refuse(f"{info.field_name} is not supported; send a JSON schema as response_format "
                          "(or guided_json) instead")
        return v


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None  # refused: no fill-in-the-middle
    best_of: int | None = Field(default=None, ge=1)  # only best_of == n (every candidate is returned)

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise _refuse("suffix (fill-in-the-middle) is not supported")
        return v


class ContentPart(_Body):
    type: str  # only "text": an image, audio or file part is a 400
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # passed to the chat template
    tool_call_id: str | None = None  # a tool result's call (required with role "tool")
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls (checked in lmforge.tools.calling)
    function_call: dict[str, Any] | None = None  # refused (the deprecated functions API)
    refusal: str | None = None  # ignored


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # A final assistant message is continued (prefill) rather than answered (vLLM's parameters).
    continue_final_message: bool = False
    add_generation_prompt: bool | None = None  # default: true, or false when continuing
    # Function calling (checked in lmforge.tools.calling): the tools offered, which may be called, and
    # whether several calls may come in one answer.
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None  # refused: the deprecated functions API (send tools)
    function_call: str | dict[str, Any] | None = None  # refused: the deprecated functions API (send tool_choice)
    modalities: list[str] | None = None  # only ["text"]
    audio: dict[str, Any] | None = None  # refused: no audio output
    prediction: dict[str, Any] | None = None  # refused: no predicted outputs
    reasoning_effort: str | None = None  # refused: the models served do not reason
    verbosity: str | None = None  # refused
    web_search_options: dict[str, Any] | None = None  # refused: no web search
    # Ignored, as vLLM ignores them: bookkeeping of OpenAI's platform.
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # prefix reuse is automatic

    @field_validator("functions", "function_call")
    @classmethod
    def _no_functions(cls, v: Any, info: Any) -> Any:
        if v:
            new = "tools" if info.field_name == "functions" else "tool_choice"
            raise _refuse(f"{info.field_name} is the deprecated functions API, which is not supported: send {new}")
        return v

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and v != ["text"]:
            raise _refuse(f"modalities must be [\"text\"], got {v}: only text is generated")
        return v

    @field_validator("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options")
    @classmethod
    def _unsupported(cls, v: Any, info: Any) -> Any:
        if v is not None:
            raise _refuse(f"{info.field_name} is not supported")
        return v


class EmbeddingRequest(_Body):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
