# Generated from notebooks/11_serving.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Token ids in, text out, a piece at a time: what a streamed answer sends. Written in
notebooks/11_serving.ipynb."""


class TextStream:
    """The text of a growing list of token ids, handed out in pieces that are final.

    A piece is held back while it could still change: when its last token ends in
    the middle of a multi-byte character (the tokenizer decodes the half character as
    U+FFFD), and while its end could be the start of a stop string. A stop string
    found anywhere in the text, even across two pieces, ends it there, and is not
    part of the answer (as in OpenAI's API)."""

    def __init__(self, decode, stop: list[str] = ()):
        self.decode = decode  # ids -> text, special tokens dropped
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the text handed out so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; the text that became final, maybe "" (once `stopped`, "")."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # a character still incomplete
            return ""
        # a stop string that ends in the new text (it may begin in text already sent)
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at != -1:
                self.stopped = True
                return self._take(text[:at])
        # hold back an end that could grow into a stop string
        keep = max((k for s in self.stop for k in range(1, len(s))
                    if text.endswith(s[:k])), default=0)
        return self._take(text[:len(text) - keep])

    def flush(self) -> str:
        """The rest, at the end of the answer (a held-back end is plain text now)."""
        if self.stopped:
            return ""
        return self._take(self.decode(self.ids))

    def _take(self, text: str) -> str:
        piece = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return piece
