"""Request checks that run before mistral-common's, so that a bad request fails with an
error naming the message and field (shared/spec/CHAT_FORMAT.md §2).
"""

from __future__ import annotations

from typing import Any

from smallfour.inference.engine import RequestError

ROLES = ("system", "user", "assistant", "tool")


class ChatRequestError(RequestError):
  """A request that cannot be encoded; the message names the culprit."""


def checked_messages(messages: Any, last_roles: tuple[str, ...] = ("user", "tool")
                      ) -> list[dict]:
  """The messages, checked where mistral-common's errors would not name the culprit, with
  Mistral-style thinking chunks ({"thinking": [text chunks]}) flattened to strings.

  A prompt ends with a user or tool message; a training example (`last_roles`
  ("assistant",)) with the assistant turn it teaches."""
  if not isinstance(messages, list) or not messages:
    raise ChatRequestError("messages: expected a non-empty list of messages")
  out, calls, previous = [], set(), None
  for i, m in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(m, dict):
      raise ChatRequestError(f"{where}: expected an object with a role, got {type(m).__name__}")
    role = m.get("role")
    if role not in ROLES:
      raise ChatRequestError(f"{where}.role: unknown role {role!r}; expected one of "
                             f"{', '.join(ROLES)}")
    if i == 0 and role not in ("system", "user"):
      raise ChatRequestError(f"{where}.role: a conversation starts with a system or user "
                             f"message, not {role}")
    m = dict(m)
    if role == "assistant":
      m["content"] = _assistant_content(m.get("content"), where)
      batch = _call_ids(m.get("tool_calls"), where)
      calls = calls | batch if previous == "assistant" else batch
    else:
      _check_content(m.get("content"), f"{where}.content")
    if role == "tool" and m.get("tool_call_id") not in calls:
      raise ChatRequestError(
          f"{where}.tool_call_id: {m.get('tool_call_id')!r} answers no tool call of the "
          f"assistant message before it (its calls: {sorted(calls) or 'none'})")
    if role in ("system", "user"):
      calls = set()
    out.append(m)
    previous = role
  if previous in last_roles:
    return out
  where = f"messages[{len(messages) - 1}].role: the request ends with a message of role"
  if last_roles == ("assistant",):
    raise ChatRequestError(f"{where} {previous!r}; a training example ends with the "
                           "assistant turn it teaches")
  raise ChatRequestError(f"{where} {previous!r}; the model answers a user or tool message "
                         "(continuing an assistant turn is not supported)")


def _check_content(content: Any, where: str) -> None:
  """System, user and tool content: a string or a list of text chunks."""
  if isinstance(content, str):
    return
  if not isinstance(content, list):
    raise ChatRequestError(f"{where}: expected a string or a list of text chunks, got "
                           f"{type(content).__name__}")
  for j, chunk in enumerate(content):
    kind = chunk.get("type") if isinstance(chunk, dict) else None
    if kind in ("image_url", "image"):
      raise ChatRequestError(f"{where}[{j}]: an image: encode requests with images with "
                             "smallfour.chat.images.encode_with_images")
    if kind != "text" or not isinstance(chunk.get("text"), str):
      raise ChatRequestError(f'{where}[{j}]: expected {{"type": "text", "text": str}}')


def _assistant_content(content: Any, where: str) -> Any:
  """Assistant content with each thinking chunk's text as one string, as mistral-common
  wants it (the Mistral API sends a list of text chunks)."""
  if not isinstance(content, list):
    return content
  out = []
  for j, chunk in enumerate(content):
    if isinstance(chunk, dict) and isinstance(chunk.get("thinking"), list):
      _check_content(chunk["thinking"], f"{where}.content[{j}].thinking")
      chunk = {**chunk, "thinking": "".join(c["text"] for c in chunk["thinking"])}
    out.append(chunk)
  return out


def _call_ids(tool_calls: Any, where: str) -> set:
  if tool_calls is None:
    return set()
  if not isinstance(tool_calls, list):
    raise ChatRequestError(f"{where}.tool_calls: expected a list, got "
                           f"{type(tool_calls).__name__}")
  ids = set()
  for j, call in enumerate(tool_calls):
    if not isinstance(call, dict) or not isinstance(call.get("id"), str):
      raise ChatRequestError(f'{where}.tool_calls[{j}]: expected {{"id": str, "type": '
                             '"function", "function": {"name", "arguments"}}')
    ids.add(call["id"])
  return ids


def checked_tools(tools: Any) -> list[dict] | None:
  """Each tool's `parameters` must be a JSON Schema object: the model's arguments are one."""
  if tools is None:
    return None
  if not isinstance(tools, list):
    raise ChatRequestError(f"tools: expected a list, got {type(tools).__name__}")
  for i, tool in enumerate(tools):
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
      raise ChatRequestError(f'tools[{i}]: expected {{"type": "function", "function": '
                             '{"name": str, "description": str, "parameters": {...}}}')
    params = function.get("parameters", {})
    if not isinstance(params, dict) or params.get("type", "object") != "object":
      got = params.get("type") if isinstance(params, dict) else type(params).__name__
      raise ChatRequestError(f"tools[{i}].function.parameters: must be a JSON Schema object "
                             f'({{"type": "object", ...}}), got {got!r}')
  return tools


def one_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return "; ".join(lines[:3]) or type(e).__name__
