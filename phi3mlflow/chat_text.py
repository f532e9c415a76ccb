"""A conversation as token ids in which what the messages say stays text.

A chat template writes role markers as special tokens (``<|user|>``, ``<|im_end|>``); a tokenizer
that parses special tokens in the whole templated text would read the same characters typed by a
user as those markers, and a message could close its own turn and open an assistant's
(``"<|end|>\\n<|assistant|>\\n..."``). OpenAI-compatible servers encode what a client sends as text.

``encode_conversation`` keeps the ordinary case exactly as it was (no message contains a special
token's text: the templated text is encoded in one go, so the ids and every answer stay the same)
and, when a message does, encodes the template's own text with its special tokens and each
message's content as text: each special token's text is split after its first character, so no
piece of it can be read as the token. Both models use it: the ONNX model through ORT GenAI's
tokenizer (phi3mlflow/genai.py) and the transformers model through its own (phi3mlflow/serve/backends.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from phi3mlflow.errors import InvalidRequest


def check_fits(texts: list[str], context_length: int | None, longest_token: int, field: str = "messages") -> None:
    """Refuse, before any tokenizing, text that cannot fit the context whatever the tokenizer does:
    no token spells more than ``longest_token`` characters, so more characters than ``context_length``
    x ``longest_token`` are more tokens than the context holds (a 900 kB message once cost every
    client its tokenizing)."""
    if not context_length or not longest_token:
        return
    chars = sum(len(t) for t in texts)
    if chars > context_length * longest_token:
        raise InvalidRequest(field, f"{'are' if field == 'messages' else 'is'} {chars} characters long: more than "
                             f"the model's context of {context_length} tokens can hold (its longest token spells "
                             f"{longest_token} characters)")  # fmt: skip


def longest_token(vocab) -> int:
    """The most characters one token of ``vocab`` (its token strings) spells: an upper bound, since a
    byte-level token string has one character per byte."""
    return max((len(t) for t in vocab), default=0)


# Private-use characters: what stands in for each message's content while the template is written.
_OPEN, _CLOSE = "\ue000", "\ue001"


class ConversationText:
    """The one tokenizer-independent rule; ``render`` writes the template around messages,
    ``encode`` turns text (special tokens parsed) into ids."""

    def __init__(self, render: Callable[[list[dict]], str], encode: Callable[[str], list[int]],
                 specials: Sequence[str]) -> None:  # fmt: skip
        self.render = render
        self.encode = encode
        texts = sorted({s for s in specials if len(s) > 1}, key=len, reverse=True)
        self.special = re.compile("|".join(map(re.escape, texts))) if texts else None

    def encode_conversation(self, messages: list[dict]) -> list[int]:
        if self.special is None or not any(self.special.search(m["content"]) for m in messages):
            return list(self.encode(self.render(messages)))
        stand_ins = [f"{_OPEN}{i}{_CLOSE}" for i in range(len(messages))]
        templated = self.render([{**m, "content": s} for m, s in zip(messages, stand_ins, strict=True)])
        # The template must write each content once, as it is: then the text between stand-ins is the
        # template's own, and the real text is that with each stand-in replaced by its content.
        parts = re.split(f"{_OPEN}(\\d+){_CLOSE}", templated)
        order = [int(i) for i in parts[1::2]]
        rebuilt = "".join(p if k % 2 == 0 else messages[int(p)]["content"] for k, p in enumerate(parts))
        if sorted(order) != list(range(len(messages))) or rebuilt != self.render(messages):
            i = next(i for i, m in enumerate(messages) if self.special.search(m["content"]))
            raise InvalidRequest(f"messages[{i}].content", "contains a special token's text, and this model's "
                                 "chat template does not keep the content as it is")  # fmt: skip
        ids: list[int] = []
        for k, part in enumerate(parts):
            ids += self.encode(part) if k % 2 == 0 else self.encode_text(messages[int(part)]["content"])
        return ids

    def encode_text(self, text: str) -> list[int]:
        """``text`` as ids that never hold a special token: each special token's text is encoded as
        its first character and the rest, neither of which is a special token."""
        assert self.special is not None
        ids: list[int] = []
        at = 0
        for match in self.special.finditer(text):
            ids += self.encode(text[at : match.start()]) if match.start() > at else []
            ids += self.encode(match.group()[0]) + self.encode(match.group()[1:])
            at = match.end()
        return ids + (self.encode(text[at:]) if at < len(text) else [])
