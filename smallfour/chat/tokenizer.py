"""The chat tokenizer: OpenAI-style requests -> prompt ids -> structured answers.

    tok = ChatTokenizer.from_file("/data/small4-bf16/tekken.json")  # or .builtin()
    prompt = tok.encode({"messages": [{"role": "user", "content": "Hi"}],
                         "reasoning_effort": "high"})
    answer = tok.parse(generated_ids)  # {"reasoning", "content", "tool_calls", "finish_reason"}
    parser = tok.stream_parser()       # parser.feed(id) -> [Delta, ...]

Prompts are encoded by mistral-common's request encoder (Tekken v15: the [MODEL_SETTINGS]
block carries `reasoning_effort`), never by a template of ours. Before it, the request is
checked (`smallfour.chat.checks`) so that a bad one fails with an error that names the
message and field; mistral-common's own checks follow. The output side is in
`smallfour.chat.output`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import random
from typing import Any, Iterable

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, SpecialTokens
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from smallfour.chat import output as chat_output
from smallfour.chat import vocab as chat_vocab
from smallfour.chat.checks import ChatRequestError, checked_messages, checked_tools, one_line
from smallfour.chat.output import StreamParser


class TokenizerFileError(ValueError):
  """A tokenizer file that is missing or not Small 4's (Tekken v15)."""


@dataclasses.dataclass(frozen=True)
class ChatTokenizer:
  """mistral-common's v15 tokenizer, with our request checks and output parsers."""

  mistral: MistralTokenizer = dataclasses.field(repr=False)
  path: pathlib.Path
  output: chat_output.OutputTokens = dataclasses.field(repr=False)

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> ChatTokenizer:
    """A `tekken.json` of version v15 (raises TokenizerFileError otherwise)."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise TokenizerFileError(f"no tokenizer file at {path}")
    try:
      mistral = MistralTokenizer.from_file(path)
    except (MistralCommonException, ValueError, KeyError, AssertionError) as e:
      raise TokenizerFileError(f"{path} is not a Tekken tokenizer file that mistral-common "
                               f"loads (its name must contain 'tekken' and end in .json): "
                               f"{one_line(e)}") from e
    version = mistral.instruct_tokenizer.tokenizer.version
    if version != TokenizerVersion.v15:
      raise TokenizerFileError(f"{path} is a {version.value} tokenizer; Mistral Small 4's "
                               "chat format is v15")
    return cls(mistral, path, _output_tokens(mistral))

  @classmethod
  def builtin(cls) -> ChatTokenizer:
    """The built-in v15 tokenizer (smallfour.chat.vocab), loaded once per process."""
    return _builtin()

  @property
  def eos_id(self) -> int:
    return self.output.eos

  @property
  def vocab_size(self) -> int:
    return self.output.vocab_size

  @property
  def reasoning_efforts(self) -> tuple[str, ...]:
    """The `reasoning_effort` values this tokenizer file allows (Small 4: none, high)."""
    builder = self.mistral.instruct_tokenizer.tokenizer.model_settings_builder
    if builder is None or builder.reasoning_effort is None:
      return ()
    return tuple(str(v) for v in builder.reasoning_effort.values)

  def encode(self, request: dict[str, Any]) -> list[int]:
    """An OpenAI-style request -> prompt ids; raises ChatRequestError.

    Reads `messages` (system / user / assistant with optional `tool_calls`,
    `reasoning_content` or thinking chunks / tool), `tools` and `reasoning_effort`; other
    keys (sampling and the like) do not change the prompt and are ignored.
    """
    if not isinstance(request, dict):
      raise ChatRequestError(f"a request is a JSON object, got {type(request).__name__}")
    messages = checked_messages(request.get("messages"))
    tools = checked_tools(request.get("tools"))
    effort = self._checked_effort(request.get("reasoning_effort"))
    try:
      parsed = ChatCompletionRequest.from_openai(messages, tools=tools,
                                                 reasoning_effort=effort)
      return list(self.mistral.encode_chat_completion(parsed).tokens)
    except (MistralCommonException, ValueError, KeyError, TypeError) as e:
      raise ChatRequestError(f"mistral-common rejected the request: {one_line(e)}") from e

  def _checked_effort(self, effort: Any) -> Any:
    if effort is not None and effort not in self.reasoning_efforts:
      allowed = ", ".join(repr(v) for v in self.reasoning_efforts)
      raise ChatRequestError(f"reasoning_effort: {effort!r} is not one of {allowed}")
    return effort

  def encode_for_training(self, request: dict[str, Any]) -> tuple[list[int], list[bool]]:
    """A conversation ending with an assistant turn -> (ids, loss_mask); raises
    ChatRequestError.

    The ids are mistral-common's encoding of the whole conversation (in its fine-tuning
    mode). The mask marks what the model itself generates: each assistant turn's tokens
    (reasoning, content, tool calls and the closing `</s>`), found by encoding prefixes
    of the conversation: a turn starts where the prompt for it ends (`encode` of the
    messages before it) and ends where the encoding through it ends. System, user and
    tool tokens and the prompt scaffolding stay unmarked.
    """
    if not isinstance(request, dict):
      raise ChatRequestError(f"a request is a JSON object, got {type(request).__name__}")
    messages = request.get("messages")
    if isinstance(messages, list) and not any(
        isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
      raise ChatRequestError("no assistant message: nothing to train on")
    messages = checked_messages(messages, last_roles=("assistant",))
    ids = self._encode_finetuning(request, messages)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      prompt = self.encode({**request, "messages": request["messages"][:i]})
      through = self._encode_finetuning(request, messages[:i + 1])
      if ids[:len(prompt)] != prompt or ids[:len(through)] != through:
        raise ChatRequestError(
            f"messages[{i}]: mistral-common's encoding of the conversation up to this turn "
            "is not a prefix of the whole one's, so its tokens cannot be told apart")
      mask[len(prompt):len(through)] = [True] * (len(through) - len(prompt))
    return ids, mask

  def _encode_finetuning(self, request: dict[str, Any], messages: list[dict]) -> list[int]:
    """Checked messages ending with an assistant turn -> ids (mistral-common)."""
    effort = self._checked_effort(request.get("reasoning_effort"))
    try:
      parsed = ChatCompletionRequest.from_openai(
          messages, tools=checked_tools(request.get("tools")), reasoning_effort=effort)
      return list(self._finetuning.encode_chat_completion(parsed).tokens)
    except (MistralCommonException, ValueError, KeyError, TypeError) as e:
      raise ChatRequestError(f"mistral-common rejected the request: {one_line(e)}") from e

  @functools.cached_property
  def _finetuning(self) -> MistralTokenizer:
    """The same tokenizer with mistral-common's fine-tuning checks (ends with an assistant
    turn) in place of the serving ones."""
    version = self.mistral.instruct_tokenizer.tokenizer.version
    return MistralTokenizer(
        self.mistral.instruct_tokenizer,
        validator=get_validator(version, mode=ValidationMode.finetuning),
        request_normalizer=get_normalizer(
            version, self.mistral.instruct_tokenizer.tokenizer.model_settings_builder))

  def parse(self, ids: Iterable[int], rng: random.Random | None = None) -> dict:
    """Generated ids -> {"reasoning", "content", "tool_calls", "finish_reason"};
    see `smallfour.chat.output.parse`. Never raises on model output."""
    return chat_output.parse(ids, self.output, rng)

  def stream_parser(self, rng: random.Random | None = None) -> StreamParser:
    """A parser fed one generated id at a time; its deltas add up to `parse`."""
    return StreamParser(self.output, rng)

  def render(self, ids: Iterable[int]) -> str:
    """Ids as text with control tokens spelled out, e.g. for showing a prompt."""
    tekken = self.mistral.instruct_tokenizer.tokenizer
    return tekken.decode([int(t) for t in ids], special_token_policy=SpecialTokenPolicy.KEEP)


@functools.cache
def _builtin() -> ChatTokenizer:
  return ChatTokenizer.from_file(chat_vocab.builtin_tekken_path())


def _output_tokens(mistral: MistralTokenizer) -> chat_output.OutputTokens:
  tekken = mistral.instruct_tokenizer.tokenizer

  def marker(token: SpecialTokens) -> int | None:
    # `.value`, not `str()`: SpecialTokens is a (str, Enum) before mistral-common 1.13, whose
    # str() is "SpecialTokens.args", not "[ARGS]".
    return tekken.get_special_token(token.value) if tekken.is_special(token.value) else None

  return chat_output.OutputTokens(
      eos=tekken.eos_id, tool_calls=marker(SpecialTokens.tool_calls),
      args=marker(SpecialTokens.args), think=marker(SpecialTokens.begin_think),
      end_think=marker(SpecialTokens.end_think), num_special=tekken.num_special_tokens,
      vocab_size=tekken.n_words, piece=tekken.id_to_byte_piece)
