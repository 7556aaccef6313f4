"""Incremental detokenization: turn one new token at a time into the text it adds.

Decoding a token alone is wrong for byte-level vocabularies (a multi-byte character spans tokens) and
for SentencePiece (leading-space handling depends on context). So, as TGI and vLLM do, each step decodes
a short window of the previous tokens with and without the new ones and emits the difference, holding
text back while it ends in an incomplete character (U+FFFD).

The window starts in the prompt's last tokens: a SentencePiece/Metaspace decoder drops the leading space
of the first token it decodes, so decoding the first generated token alone would lose the space that
belongs before it ("Hello" + "▁world" must stream " world", not "world").
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # how much of the prompt seeds the window (vLLM uses the same)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # start of the context window
        self._read_offset = len(self._ids)  # tokens before this have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now certain (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end of generation: whatever is still held back, incomplete characters included."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]
