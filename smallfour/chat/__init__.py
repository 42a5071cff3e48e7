"""Chat: requests -> prompt ids (+ images), generated ids -> reasoning / content / tool calls.

    tokenizer.py         ChatTokenizer: mistral-common's v15 tokenizer, encode and parse
    checks.py            request checks whose errors name the message and field
    output.py            ids -> {reasoning, content, tool_calls}, whole or streamed (Delta)
    printer.py           StreamPrinter: streamed deltas shown as they come
    vocab.py             the built-in v15 tekken.json for presets
    images.py            chat requests with images -> ids and pixels
    image_processing.py  image loading and both references' preprocessing

The names used by every caller are re-exported here: `from smallfour.chat import
ChatTokenizer`.
"""

from smallfour.chat.checks import ChatRequestError
from smallfour.chat.output import Delta, StreamParser
from smallfour.chat.printer import StreamPrinter
from smallfour.chat.tokenizer import ChatTokenizer, TokenizerFileError

__all__ = ["ChatRequestError", "ChatTokenizer", "Delta", "StreamParser", "StreamPrinter",
           "TokenizerFileError"]
