"""`POST /v1/completions` (the legacy text completion): prompts as `GenerateRequest`s, and OpenAI's choices
and logprobs built from the replies."""

from __future__ import annotations

from pydantic import Field

from modelworks.llm.v1 import llm_pb2
from services.openai.errors import invalid, not_supported, proto_values
from services.openai.sampling import FINISH_REASONS, TextRequest

MAX_PROMPTS = 16


class CompletionRequest(TextRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise not_supported(
                "a prompt of token ids", "send the prompt as text (a string or a list of strings)", "prompt"
            )
        if len(prompts) * self.n > MAX_PROMPTS:
            raise invalid(
                f"prompts x n is {len(prompts) * self.n}; at most {MAX_PROMPTS} are generated per request", "prompt"
            )
        return prompts


def check_supported(body: CompletionRequest) -> None:
    if body.suffix:
        raise not_supported(
            "suffix", "the served models complete after the prompt only (no fill-in-the-middle)", "suffix"
        )
    if body.best_of not in (None, body.n):
        raise not_supported("best_of other than n", "every generated choice is returned; ask for n choices", "best_of")
    if body.echo and body.logprobs is not None:
        raise not_supported("echo with logprobs", "the prompt's own log-probabilities are not computed", "echo")


def generate_requests(body: CompletionRequest, model: str, adapter: str) -> list[llm_pb2.GenerateRequest]:
    """Prompt p's choice j is request p * n + j (OpenAI's order of choices)."""
    logprobs, prompts = body.logprobs is not None, body.prompts()
    with proto_values("request"):
        return [
            llm_pb2.GenerateRequest(
                model=model,
                adapter=adapter,
                prompt=prompt,
                sampling=llm_pb2.SamplingParams(**body.sampling(body.max_tokens, body.logprobs, logprobs, j)),
            )
            for prompt in prompts
            for j in range(body.n)
        ]


def logprobs(entries, offset: int) -> dict:
    """OpenAI's legacy logprobs: tokens, their logprobs, the top alternatives by token, each token's offset."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entry in entries:
        tokens.append(entry.token)
        token_logprobs.append(entry.logprob)
        top.append({alt.token: alt.logprob for alt in entry.top})
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def choice(index: int, text: str, finish_reason: int | None, entries=None, offset: int = 0) -> dict:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs(entries, offset) if entries is not None else None,
        "finish_reason": FINISH_REASONS.get(finish_reason, "stop") if finish_reason else None,
    }
