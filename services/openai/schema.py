"""The base of every request body: unknown fields are ignored, as OpenAI does, and a field sent as `null`
means what leaving it out means (clients send `"n": null`, `"stream": null`, `"logprobs": null`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_unset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data
