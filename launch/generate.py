"""Chats with a converted checkpoint or a seeded random preset, or generates from raw ids.

  python launch/generate.py --config=tiny --prompt="Name the capital of France."
  python launch/generate.py --ckpt=/data/small4-bf16 --prompt="What is 17 * 23?" \
      --reasoning_effort=high
  python launch/generate.py --ckpt=/data/small4-bf16 --messages=launch/examples/weather.json
  python launch/generate.py --ckpt=/data/small4-bf16 --prompt_ids=1,1784,3  # raw ids
  python launch/generate.py --config=tiny --prompt="Hi" --dry_run  # the prompt, no weights
  python launch/generate.py --ckpt=/data/small4-bf16 --prompt="What is this?" --image=cat.png
  python launch/generate.py --ckpt=/data/small4-bf16 --prompt_ids=1,10,1784 --image=cat.png

The prompt is one user turn (--prompt) or an OpenAI-style request object (--messages:
messages, tools, reasoning_effort; images as OpenAI image_url parts with data URLs or
local paths), encoded by mistral-common (smallfour.chat); --image adds images to
--prompt's message, or, with raw --prompt_ids, stands for the [IMG] ids in them, one
each, in order (each expanded to its image's tokens). The answer
streams to the terminal: reasoning under its own header, then the answer, then each tool
call with its arguments. `--output_json` writes prompt_ids, token_ids (prompt excluded),
reasoning, content, tool_calls and finish_reason. The tokenizer is --tokenizer, else the
checkpoint's (or --config directory's) tekken.json, else, for a preset, the built-in one
(smallfour.chat.vocab). With several processes (launch/multihost/, or
--coordinator_address/--num_processes/--process_id), every process runs this same command
on its share of the mesh and only process 0 prints and writes.
"""

import json
import sys
import time

import jax
from absl import app, flags

from smallfour import distributed, loading, logs
from smallfour.chat import ChatRequestError, ChatTokenizer, StreamPrinter, image_processing
from smallfour.chat.images import encode_with_images
from smallfour.chat.output import collect
from smallfour.config import IMAGE_PROCESSORS, TextConfig
from smallfour.inference.engine import Engine
from smallfour.inference.requests import Request, RequestError
from smallfour.inference.sampling import BY_REASONING_EFFORT, Sampling
from smallfour.nn.decoder import Transformer

# Answer lengths per reasoning effort (the sampling is `sampling.BY_REASONING_EFFORT`, the
# model card's): "high" traces run to thousands of tokens. Raw --prompt_ids use "none".
MAX_NEW_TOKENS = {"none": 1024, "high": 8192}

_CKPT = flags.DEFINE_string("ckpt", None, "A checkpoint written by launch/convert.py.")
_CONFIG = flags.DEFINE_string("config", None, "A preset (random weights, seeded) when no --ckpt.")
_PROMPT = flags.DEFINE_string("prompt", None, "One user message.")
_MESSAGES = flags.DEFINE_string("messages", None,
                                "A JSON file: a request {messages, tools?, reasoning_effort?} "
                                "or a list of messages.")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "Raw prompt token ids, comma separated.")
_REASONING = flags.DEFINE_enum("reasoning_effort", None, ["none", "high"],
                               "Overrides the request's (default none).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A tekken.json (overrides the default).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Encode and print the prompt; load no weights.")
_IMAGE = flags.DEFINE_multi_string(
    "image", [], "An image file (repeatable): added to --prompt's message, or standing for "
    "the [IMG] ids of --prompt_ids, one each, in order.")
_IMAGE_PROCESSOR = flags.DEFINE_enum(
    "image_processor", None, list(IMAGE_PROCESSORS),
    "Image preprocessing; default the checkpoint's (mistral_common for params.json sources, "
    "transformers for config.json-only ones).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None,
                                "Tokens to generate at most (default per reasoning effort).")
_TEMPERATURE = flags.DEFINE_float("temperature", None,
                                  "0 means greedy (default per reasoning effort).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass in (0, 1].")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (and weight seed for --config).")
_MAX_LEN = flags.DEFINE_integer("max_len", None,
                                "Tokens the sequence may hold (default prompt + "
                                "max_new_tokens).")
_ENGINE = loading.define_engine_flags()
_MESH = flags.DEFINE_string("mesh", "data:1,expert:1,tensor:1",
                            "Device mesh axis sizes over all processes' devices.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs "
                                   "(default: auto-detect SLURM / MPI / TPU pods).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype; default the checkpoint's stored dtype.")
_WEIGHTS = loading.define_weights_flags()
_OUTPUT_JSON = flags.DEFINE_string("output_json", None,
                                   "Write the prompt and the answer here as JSON.")


def _load_model(cfg: TextConfig) -> tuple[Transformer, jax.sharding.Mesh | None]:
  try:
    return loading.model(cfg, ckpt=_CKPT.value, mesh_spec=_MESH.value, dtype=_DTYPE.value,
                         seed=_SEED.value, **_WEIGHTS.values())
  except loading.LoadError as e:
    loading.fail(str(e))


def _tokenizer(cfg: TextConfig, required: bool) -> ChatTokenizer | None:
  """`loading.tokenizer`'s; unless `required`, None when there is none that fits."""
  try:
    return loading.tokenizer(cfg, ckpt=_CKPT.value, config=_CONFIG.value,
                             path=_TOKENIZER.value)
  except loading.LoadError as e:
    if required:
      loading.fail(f"{e} (or give raw --prompt_ids)")
    return None


def _request() -> dict | None:
  """The chat request from --prompt or --messages (None for raw --prompt_ids)."""
  given = [f for f in (_PROMPT, _MESSAGES, _PROMPT_IDS) if f.value not in (None, [])]
  if len(given) != 1:
    raise app.UsageError("give exactly one of --prompt, --messages and --prompt_ids")
  if _PROMPT_IDS.value:
    return None
  if _MESSAGES.value and _IMAGE.value:
    raise app.UsageError("--image goes with --prompt or --prompt_ids; put a --messages "
                         "request's images in its messages (image_url parts)")
  if _PROMPT.value is not None:
    parts = [{"type": "image_url", "image_url": {"url": path}} for path in _IMAGE.value]
    content = [{"type": "text", "text": _PROMPT.value}, *parts] if parts else _PROMPT.value
    request = {"messages": [{"role": "user", "content": content}]}
  else:
    try:
      with open(_MESSAGES.value, encoding="utf-8") as f:
        request = json.load(f)
    except (OSError, ValueError) as e:
      loading.fail(f"--messages={_MESSAGES.value}: {e}")
    request = {"messages": request} if isinstance(request, list) else request
  if _REASONING.value is not None and isinstance(request, dict):
    request = {**request, "reasoning_effort": _REASONING.value}
  return request


def _sampling(effort: str) -> tuple[Sampling, int]:
  """Flags over the effort's defaults -> (sampling, max_new_tokens)."""
  default = BY_REASONING_EFFORT[effort]
  pick = lambda flag, value: value if flag.value is None else flag.value  # noqa: E731
  try:
    return (Sampling(pick(_TEMPERATURE, default.temperature), pick(_TOP_K, default.top_k),
                     pick(_TOP_P, default.top_p)), pick(_MAX_NEW, MAX_NEW_TOKENS[effort]))
  except ValueError as e:
    raise app.UsageError(f"bad sampling flag: {e}") from None


def _has_images(request: dict | None) -> bool:
  return bool(_IMAGE.value) or request is not None and any(
      isinstance(m, dict) and isinstance(m.get("content"), list) and any(
          isinstance(p, dict) and p.get("type") in ("image_url", "image") for p in m["content"])
      for m in request.get("messages") or [])


def _encode(cfg: TextConfig, request: dict | None,
            tok: ChatTokenizer | None) -> tuple[list[int], list]:
  """The prompt ids and its images' pixels; raises ValueError (incl. ChatRequestError)."""
  if not _has_images(request):
    ids = [int(t) for t in _PROMPT_IDS.value] if request is None else tok.encode(request)
    return ids, []
  if cfg.vision is None:
    loading.fail("images given, but the model has no vision encoder")
  if request is not None:
    return encode_with_images(tok, request, cfg.vision, _IMAGE_PROCESSOR.value)
  encoded = [image_processing.encode(image_processing.load(path, path), cfg.vision,
                                     _IMAGE_PROCESSOR.value, path)
             for path in _IMAGE.value]
  ids = image_processing.expand_placeholders([int(t) for t in _PROMPT_IDS.value],
                                             [tokens for tokens, _ in encoded], cfg.vision)
  return ids, [pixels for _, pixels in encoded]


def _dry_run(prompt: list[int], tok: ChatTokenizer | None, sampling: str) -> None:
  print(f"{sampling}\nprompt: {len(prompt)} tokens\n{','.join(map(str, prompt))}")
  if tok is not None and all(0 <= t < tok.vocab_size for t in prompt):
    print(tok.render(prompt))
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump({"prompt_ids": prompt}, f)


def main(argv):
  del argv
  logs.library_logs_at_warning()
  request = _request()
  cfg = loading.config_from_flags(_CKPT.value, _CONFIG.value)
  # Raw ids need no tokenizer; a dry run shows them as text when there is one.
  tok = _tokenizer(cfg, required=True) if request is not None else (
      _tokenizer(cfg, required=False) if _DRY_RUN.value else None)
  try:
    prompt, pixels = _encode(cfg, request, tok)
  except (ValueError, ChatRequestError) as e:
    loading.fail(f"bad prompt: {e}")
  sampling, max_new = _sampling((request or {}).get("reasoning_effort") or "none")
  if _DRY_RUN.value:
    return _dry_run(prompt, tok, f"{sampling}, max_new_tokens={max_new}")
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except distributed.DistributedError as e:
    raise app.UsageError(str(e)) from None
  leader = distributed.is_leader()
  model, mesh = _load_model(cfg)
  engine = Engine(model, max_len=_MAX_LEN.value or len(prompt) + max_new, max_batch=1,
                  mesh=mesh, **_ENGINE.values())
  parser = tok.stream_parser() if request is not None else None
  terminal = StreamPrinter()
  start = time.perf_counter()
  generated, deltas, shown = [], [], 0
  events = []
  try:
    ticket = engine.submit(Request(tuple(prompt), max_new, sampling, _SEED.value,
                                   tuple(pixels)), events.append)
  except RequestError as e:
    loading.fail(str(e))
  while engine.step() or events:
    for event in events:
      if event.error:
        loading.fail(event.error)
      if event.token is None:
        continue
      generated.append(event.token)
      if parser is None:
        if leader:
          terminal.raw(event.token)
        continue
      deltas += parser.feed(event.token)
      if leader:
        terminal.show(deltas[shown:])
      shown = len(deltas)
    events.clear()
  seconds = time.perf_counter() - start
  if parser is None:
    answer = {"finish_reason": "stop" if generated[-1:] == [cfg.eos_token_id] else "length"}
  else:
    deltas += parser.finish()
    answer = collect(deltas)
  if not leader:
    return
  terminal.show(deltas[shown:])
  where = f"mesh {dict(mesh.shape)}" if mesh is not None else "1 device"
  print(f"\n[{len(generated)} tokens in {seconds:.2f} s incl. compilation, finish_reason "
        f"{answer['finish_reason']}, backend {jax.default_backend()}, {where}, "
        f"{jax.process_count()} process(es)]", file=sys.stderr)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump({"prompt_ids": prompt, "token_ids": generated, **answer,
                 "cached_tokens": ticket.cached_tokens}, f, ensure_ascii=False)


if __name__ == "__main__":
  app.run(main)
