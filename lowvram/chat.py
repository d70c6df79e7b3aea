"""Chat formats of each generation, tool calling, and the chat API behind `Model.chat*`.

Messages are OpenAI-style dicts: role system/user/assistant/observation (`tool` and `function`
are aliases of observation), `content` a string, assistant `tool_calls` in the OpenAI shape.
A THUDM-style `metadata` key is honoured by the role-token formats.

  chatglm   ChatGLM-6B: a lone query is sent bare; otherwise "[Round i]\\n问：q\\n答：a\\n" from 0.
            No system, no observation (the original has neither). [gMASK] <sop> at the end.
  chatglm2  ChatGLM2-6B / CodeGeeX2: "[Round i]\\n\\n问：q\\n\\n答：a\\n\\n" from 1. No system.
  chatglm3  <|role|> + sp("{metadata}\\n") + sp(content) per message, <|assistant|> to answer.
  glm4      <|role|>{metadata}\\n{content} per message (empty messages skipped), <|assistant|>.

The model answers a role-token prompt with "{metadata}\\n{content}": an empty metadata line is
plain text; otherwise the metadata names a tool (ChatGLM3: "interpreter" is its code
interpreter) and the content holds the call (ChatGLM3: a ```python tool_call(k=v)``` block,
parsed with `ast`, never evaluated; GLM-4: a JSON object).
"""

from __future__ import annotations

import ast
import json
import re
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator

ROUND_FORMATS = ("chatglm", "chatglm2")
ROLE_FORMATS = ("chatglm3", "glm4")
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "observation": "observation",
         "tool": "observation", "function": "observation"}

CHATGLM3_TOOL_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
GLM4_TOOL_PROMPT = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                    "你的任务是针对用户的问题和要求提供适当的答复和支持。")
GLM4_TOOL_SUFFIX = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
CODE_INTERPRETER = "interpreter"  # ChatGLM3's metadata for its code interpreter


# ---- messages and tools ---------------------------------------------------------------------


def _text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text":
                parts.append(str(p.get("text", "")))
            else:
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise ValueError(f"{where}: content part of type {kind!r} is not supported (text only)")
        return "".join(parts)
    raise ValueError(f"{where}: content must be a string, got {type(content).__name__}")


def normalize(messages) -> list[dict]:
    """Validated copies: role mapped to system/user/assistant/observation, content a string."""
    if isinstance(messages, dict) or isinstance(messages, str) or not hasattr(messages, "__iter__"):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r:.80}")
        role = ROLES.get(m["role"])
        if role is None:
            raise ValueError(f"messages[{i}]: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        msg = {"role": role, "content": _text(m.get("content"), f"messages[{i}]"),
               "metadata": str(m.get("metadata") or "")}
        if m.get("tools") is not None:  # THUDM's way of giving tools: on a system message
            if role != "system":
                raise ValueError(f"messages[{i}]: only system messages carry tools")
            functions_of(m["tools"])
            msg["tools"] = list(m["tools"])
        if m.get("tool_calls"):
            if role != "assistant":
                raise ValueError(f"messages[{i}]: only assistant messages carry tool_calls")
            msg["tool_calls"] = [_call_of(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(m["tool_calls"])]
        out.append(msg)
    return out


def _call_of(call, where: str) -> tuple[str, dict]:
    """(name, arguments dict) of an OpenAI tool call (arguments given as a JSON string or a dict)."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"{where}: expected {{'function': {{'name': ..., 'arguments': ...}}}}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: arguments are not valid JSON ({e})") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}: arguments must be a JSON object")
    return fn["name"], args


def functions_of(tools) -> list[dict]:
    """The function objects of OpenAI `tools` ({"type": "function", "function": {...}}; bare functions accepted)."""
    if tools is None:
        return []
    if not isinstance(tools, (list, tuple)):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {...}}")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(t, dict) and t.get("type", "function") != "function":
            raise ValueError(f"tools[{i}]: type {t.get('type')!r} is not supported (only 'function')")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        out.append(fn)
    return out


def tools_system_prompt(chat_format: str, tools) -> str:
    """The system text that presents `tools` to the model, as each model was trained."""
    fns = functions_of(tools)
    if chat_format == "chatglm3":
        return CHATGLM3_TOOL_PROMPT + "\n" + json.dumps(fns, indent=4, ensure_ascii=False)
    if chat_format == "glm4":
        text = GLM4_TOOL_PROMPT + "\n\n# 可用工具"
        for fn in fns:
            text += f"\n\n## {fn['name']}\n\n{json.dumps(fn, indent=4, ensure_ascii=False)}{GLM4_TOOL_SUFFIX}"
        return text
    raise ValueError(f"the {chat_format} chat format has no tool calling (ChatGLM3 and GLM-4 have)")


def _py(v) -> str:
    """A Python literal for a JSON value (how ChatGLM3 writes tool_call arguments)."""
    return repr(v)


def _call_body(chat_format: str, name: str, args: dict) -> str:
    if chat_format == "glm4":
        return json.dumps(args, ensure_ascii=False)
    if name == CODE_INTERPRETER:
        return f"```python\n{args.get('code', '')}\n```"
    return "```python\ntool_call(" + ", ".join(f"{k}={_py(v)}" for k, v in args.items()) + ")\n```"


# ---- rendering ------------------------------------------------------------------------------


def render(tok, messages, add_generation_prompt: bool = True, tools=None) -> list[int]:
    """Prompt ids of a conversation in the tokenizer's chat format (see the module docstring)."""
    fmt = tok.chat_format
    msgs = normalize(messages)
    if getattr(tok, "template", None):
        try:
            return _render_template(tok, msgs, add_generation_prompt, tools)
        except Exception as e:  # a template using what this renderer lacks: the built-in GLM-4 format, said once
            if not getattr(tok, "_template_warned", False):
                warnings.warn(f"the checkpoint's chat template failed ({type(e).__name__}: {e}); using lowvram's "
                              "GLM-4 format", stacklevel=2)
                tok._template_warned = True
    if fmt in ROUND_FORMATS:
        if tools:
            raise ValueError(f"the {fmt} chat format has no tool calling (ChatGLM3 and GLM-4 have); "
                             "pass chat_format='chatglm3' if this checkpoint is ChatGLM3")
        return _render_rounds(tok, msgs, add_generation_prompt)
    if fmt not in ROLE_FORMATS:
        raise ValueError(f"unknown chat format {fmt!r}")
    ids = list(tok.prefix_ids)
    if tools:
        ids += _message(tok, "system", "", tools_system_prompt(fmt, tools))
    for m in msgs:
        if m.get("tools") and fmt == "chatglm3":  # build_chat_input: the tools, as given, after the system text
            tools_json = json.dumps(m["tools"], indent=4, ensure_ascii=False)
            ids += _message(tok, "system", m["metadata"], m["content"] + "\n" + tools_json)
            continue
        if m.get("tools"):  # GLM-4's chat_template: the tools block where the message is, then its content
            ids += _message(tok, "system", "", tools_system_prompt(fmt, m["tools"]))
        calls = m.get("tool_calls", [])
        # GLM-4's template skips empty messages; ChatGLM3 renders every one (but a pure call is just the call)
        if m["content"] or (fmt == "chatglm3" and not calls):
            ids += _message(tok, m["role"], m["metadata"], m["content"])
        for name, args in calls:
            ids += _message(tok, "assistant", name, _call_body(fmt, name, args))
    if add_generation_prompt:
        ids.append(tok.token_id("<|assistant|>"))
    return ids


def _render_template(tok, msgs: list[dict], add_generation_prompt: bool, tools) -> list[int]:
    """The checkpoint's jinja chat template, rendered as transformers renders it (sandboxed, trimmed blocks, its
    tojson). Tool calls go in as GLM's templates take them: an assistant turn whose metadata is the function name
    and whose content is the JSON arguments. Special-token text inside messages becomes tokens, as there."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    turns = []
    for m in msgs:
        turn = {"role": m["role"], "content": m["content"]}
        if m["metadata"]:
            turn["metadata"] = m["metadata"]
        if m.get("tools"):
            turn["tools"] = m["tools"]
        if m["content"] or not m.get("tool_calls"):
            turns.append(turn)
        turns += [{"role": "assistant", "metadata": name, "content": json.dumps(args, ensure_ascii=False)}
                  for name, args in m.get("tool_calls", [])]
    template = env.from_string(tok.template)
    given = list(tools or [])
    tools = given + [t for m in msgs for t in m.get("tools", [])]  # at the top too (GLM-4-0414's templates)
    text = template.render(messages=turns, tools=tools or None, add_generation_prompt=add_generation_prompt)
    if given and text == template.render(messages=turns, tools=None, add_generation_prompt=add_generation_prompt):
        # a template that reads tools only from a system message (glm-4-9b-chat's): `tools=` goes there
        turns = [{"role": "system", "content": "", "tools": given}] + turns
        text = template.render(messages=turns, tools=tools, add_generation_prompt=add_generation_prompt)
    return tok.encode_template(text)


def _message(tok, role: str, metadata: str, content: str) -> list[int]:
    role_id = tok.token_id(f"<|{role}|>")
    if tok.chat_format == "chatglm3":  # the original encodes the metadata line and the content apart
        return [role_id] + tok.encode(f"{metadata}\n") + tok.encode(content)
    return [role_id] + tok.encode(f"{metadata}\n{content}")  # GLM-4: one text after the role token


def _render_rounds(tok, msgs: list[dict], add_generation_prompt: bool) -> list[int]:
    fmt = tok.chat_format
    name = "ChatGLM-6B" if fmt == "chatglm" else "ChatGLM2"
    for i, m in enumerate(msgs):
        if m["role"] in ("system", "observation"):
            raise ValueError(f"messages[{i}]: the {name} chat format ({fmt}) has no {m['role']} role; "
                             "it only alternates user and assistant turns")
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"messages[{i}]: expected a {want} message (the {name} format alternates user and "
                             f"assistant, starting with user), got {m['role']}")
        if m.get("tool_calls"):
            raise ValueError(f"messages[{i}]: the {name} chat format has no tool calls")
    if not msgs:
        raise ValueError("messages is empty")
    if add_generation_prompt and msgs[-1]["role"] != "user":
        raise ValueError(f"messages[{len(msgs) - 1}]: the conversation must end with a user message to answer")
    pairs = [(msgs[i]["content"], msgs[i + 1]["content"] if i + 1 < len(msgs) else None)
             for i in range(0, len(msgs), 2)]
    if fmt == "chatglm":
        if len(pairs) == 1 and pairs[0][1] is None:
            prompt = pairs[0][0]  # a first turn is the bare query
        else:
            prompt = "".join(f"[Round {i}]\n问：{q}\n答：" + (f"{a}\n" if a is not None else "")
                             for i, (q, a) in enumerate(pairs))
    else:
        prompt = "".join(f"[Round {i}]\n\n问：{q}\n\n答：" + (f"{a}\n\n" if a is not None else "")
                         for i, (q, a) in enumerate(pairs, 1))
    return tok.encode_prompt(prompt)


# ---- parsing the model's answer -------------------------------------------------------------


_FENCE = re.compile(r"```[^\n]*\n(.*?)\n?```", re.S)


def _fenced(body: str) -> str:
    m = _FENCE.search(body)
    return m.group(1) if m else body.strip()


def _jsonable(v, where: str):
    if isinstance(v, tuple) or isinstance(v, (set, frozenset)):
        return [_jsonable(x, where) for x in v]
    if isinstance(v, list):
        return [_jsonable(x, where) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x, where) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(f"{where} is a {type(v).__name__}, not a JSON value")


def parse_tool_call(chat_format: str, name: str, body: str, tools=None) -> dict:
    """{"name", "arguments"} of one tool-call segment, or {"error", "name", "raw"}; never raises."""
    name = name.strip()
    try:
        known = [fn["name"] for fn in functions_of(tools)]
    except ValueError:
        known = []
    try:
        if chat_format == "chatglm3" and name == CODE_INTERPRETER:
            return {"name": name, "arguments": {"code": _fenced(body)}}
        if known and name not in known:
            raise ValueError(f"the model called {name!r}, which is not among the tools ({', '.join(known)})")
        if chat_format == "chatglm3":
            args = _parse_chatglm3_call(_fenced(body))
        elif chat_format == "glm4":
            try:
                args = json.loads(body.strip())
            except json.JSONDecodeError as e:
                raise ValueError(f"arguments are not valid JSON ({e})") from None
            if not isinstance(args, dict):
                raise ValueError(f"arguments must be a JSON object, got {type(args).__name__}")
        else:
            raise ValueError(f"the {chat_format} chat format has no tool calls")
        return {"name": name, "arguments": args}
    except (ValueError, SyntaxError, RecursionError, MemoryError) as e:
        return {"error": f"malformed tool call to {name!r}: {e}", "name": name, "raw": body}


def _parse_chatglm3_call(code: str) -> dict:
    """Keyword arguments of `tool_call(k=literal, ...)`; anything but literals is refused."""
    if len(code) > 100_000:
        raise ValueError("tool call longer than 100000 characters")
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not a tool_call(...) expression ({e.msg})") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ValueError("expected a single tool_call(...) expression")
    if call.args:
        raise ValueError("tool_call takes keyword arguments only")
    args = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ValueError("**kwargs is not allowed in tool_call")
        try:
            value = ast.literal_eval(kw.value)
        except ValueError:
            raise ValueError(f"argument {kw.arg!r} is not a literal") from None
        args[kw.arg] = _jsonable(value, f"argument {kw.arg!r}")
    return args


def _segments(tok, ids: list[int]) -> list[list[int]]:
    """Generated ids split at <|assistant|> (a role-token model may answer in several segments)."""
    if tok.chat_format not in ROLE_FORMATS:
        return [ids]
    split = tok.token_id("<|assistant|>")
    segs, cur = [], []
    for i in ids:
        if i == split:
            segs.append(cur)
            cur = []
        else:
            cur.append(i)
    segs.append(cur)
    return segs


def _split_meta(tok, text: str) -> tuple[str, str]:
    if tok.chat_format not in ROLE_FORMATS or "\n" not in text:
        return "", text
    meta, body = text.split("\n", 1)
    return meta, body


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def is_call(chat_format: str, metadata: str, tools=None) -> bool:
    """Whether a segment with this metadata line is a tool call, as the original demos decide.

    ChatGLM3: any metadata once tools are given, and always its code interpreter. GLM-4: the
    metadata names one of the tools. Elsewhere the line is just text.
    """
    name = metadata.strip()
    if not name:
        return False
    if chat_format == "chatglm3":
        return bool(tools) or name == CODE_INTERPRETER
    if chat_format == "glm4":
        try:
            return name in {fn["name"] for fn in functions_of(tools)}
        except ValueError:
            return False
    return False


def assemble(tok, segments: list[tuple[str, str]], tools=None, observation: bool = False) -> dict:
    """The OpenAI assistant message from the (metadata, body) segments of an answer.

    `observation`: the answer ended on <|observation|>, i.e. the model waits for a tool result; a
    metadata segment is then parsed as a call even without `tools` (tools described in a system
    prompt by hand), and kept as text too since it was streamed as text.
    """
    fmt = tok.chat_format
    texts, calls, errors = [], [], []
    for meta, body in segments:
        call = is_call(fmt, meta, tools)
        if not call:
            text = (f"{meta}\n{body}" if meta.strip() else body).strip()
            if text:
                texts.append(text)
            if not (observation and meta.strip() and fmt in ROLE_FORMATS):
                continue
        parsed = parse_tool_call(fmt, meta, body, tools)
        if "error" not in parsed:
            calls.append({"id": new_call_id(), "type": "function",
                          "function": {"name": parsed["name"],
                                       "arguments": json.dumps(parsed["arguments"], ensure_ascii=False)}})
        elif call:
            errors.append(parsed)
            texts.append(f"{meta.strip()}\n{body.strip()}")
    msg: dict = {"role": "assistant", "content": "\n".join(texts) if texts or not calls else None}
    if calls:
        msg["tool_calls"] = calls
    if errors:
        msg["error"] = {"type": "tool_call_parse_error", "message": errors[0]["error"],
                        "name": errors[0]["name"], "raw": errors[0]["raw"]}
    return msg


def parse_response(tok, ids, tools=None) -> dict:
    """The assistant message (content and/or tool_calls) of generated ids (a final stop id may be included)."""
    ids = [int(i) for i in ids]
    observation = tok.special_ids.get("<|observation|>")
    ended = bool(ids) and observation is not None and ids[-1] == observation
    if ids and ids[-1] in tok.stop_ids:
        ids = ids[:-1]
    segs = [_split_meta(tok, tok.decode(s, reply=True)) for s in _segments(tok, ids)]
    return assemble(tok, segs, tools, observation=ended)


# ---- streaming ------------------------------------------------------------------------------


class _Answer:
    """Consumes generated ids; hands out content deltas whose concatenation is the final content."""

    def __init__(self, tok, tools=None):
        self.tok, self.tools = tok, tools
        self.role = tok.chat_format in ROLE_FORMATS
        self.split = tok.token_id("<|assistant|>") if self.role else None
        self.ids: list[int] = []
        self.done: list[tuple[str, str]] = []  # finished (metadata, body) segments
        self.any_content = False
        self._new_segment()

    def _new_segment(self):
        self.dec = self.tok.stream_decoder(reply=True)
        self.text = ""
        self.meta = None if self.role else ""  # None until the metadata line is complete
        self.sent = 0  # chars of this segment's stripped text already handed out
        self.started = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if token_id == self.split:
            out = self._close()
            self._new_segment()
            return out
        self.text += self.dec.push(token_id)
        return self._delta(final=False)

    def finish(self) -> str:
        return self._close()

    def _close(self) -> str:
        self.text += self.dec.flush()
        out = self._delta(final=True)
        self.done.append((self.meta, self._body()))
        return out

    def _body(self) -> str:
        return self.text.split("\n", 1)[1] if self.role else self.text

    def _delta(self, final: bool) -> str:
        if self.meta is None:
            if "\n" in self.text:
                self.meta = self.text.split("\n", 1)[0]
            elif final:
                self.meta = ""  # no metadata line at all: the whole segment is text
                self.text = "\n" + self.text
            else:
                return ""
        if is_call(self.tok.chat_format, self.meta, self.tools):
            return ""  # a tool call: not streamed as text
        body = self._body()
        ready = (f"{self.meta}\n{body}" if self.meta.strip() else body).strip()
        if len(ready) <= self.sent:
            return ""
        out = ready[self.sent:]
        if not self.started:
            self.started = True
            if self.any_content:
                out = "\n" + out
            self.any_content = True
        self.sent = len(ready)
        return out


class ChatStream:
    """Iterate for text deltas; afterwards `.message`, `.response`, `.history`, `.finish_reason`, `.usage`.

    `cancel()` may be called from another thread (it takes effect before the next token); `close()`
    ends generation now and keeps what was generated, e.g. after a KeyboardInterrupt.
    """

    def __init__(self, model, messages, tools=None, history_style: str = "dicts", query=None,
                 max_new_tokens: int | None = None, max_length: int | None = None, stop_token_ids=None,
                 should_stop: Callable[[], bool] | threading.Event | None = None, **sampling):
        tok = model.tokenizer
        if tok is None:
            raise ValueError(f"{model.path}: no tokenizer (the checkpoint has no tokenizer files, or it was loaded "
                             "with tokenizer=False); chat needs one: lowvram.load_tokenizer, then set model.tokenizer")
        self.tok, self.model, self.tools = tok, model, tools
        self.messages = [dict(m) for m in messages]
        self.prompt_ids = tok.apply_chat_template(self.messages, add_generation_prompt=True, tools=tools)
        # tools given on a system message (THUDM's demos) are tools the answer may call too
        tools = tools or [t for m in self.messages if m.get("role") == "system" for t in m.get("tools") or []] or None
        self.tools = tools
        # max_length (THUDM habit) bounds prompt + answer; max_new_tokens the answer; both the context
        limit = min(model.ctx, max_length or model.ctx)
        room = limit - len(self.prompt_ids)
        if room < 0 and limit < model.ctx:  # past the context itself, stream_generate says so
            from .model import ContextError

            raise ContextError(f"the conversation is {len(self.prompt_ids)} tokens, longer than max_length="
                               f"{max_length}: drop earlier turns or raise it")
        if max_new_tokens is not None:
            model._check_budget(max_new_tokens)
        room = max(room, 0)
        self.max_new_tokens = room if max_new_tokens is None else min(max_new_tokens, room)
        stops = tok.stop_ids if stop_token_ids is None else list(stop_token_ids)
        # <|observation|> ends the answer too, but this class sees it: it marks a tool call
        obs = tok.special_ids.get("<|observation|>")
        self._observation_id = obs if obs in stops else None
        self._tokens = model.stream_generate(self.prompt_ids, max_new_tokens=self.max_new_tokens,
                                             stop_token_ids=[i for i in stops if i != obs], **sampling)
        self._answer = _Answer(tok, tools)
        self.ended_on_observation = False
        self._cancel = threading.Event()
        self._should_stop = should_stop.is_set if hasattr(should_stop, "is_set") else should_stop
        self._history_style, self._query = history_style, query
        self._tail = ""
        self._streamed = ""  # every delta handed out so far
        self.finish_reason: str | None = None
        self.message: dict | None = None
        self._broken = False  # an exception ended the token stream: what was generated ends 'cancelled'

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while self.finish_reason is None:
            if self._broken or self._cancel.is_set() or (self._should_stop is not None and self._should_stop()):
                self.close()
                break
            try:
                token = next(self._tokens)
            except StopIteration:
                n = len(self._answer.ids)
                self._finish("length" if n >= self.max_new_tokens else "stop")
                break
            except BaseException:  # e.g. KeyboardInterrupt mid-step: the generator is gone, this was no normal end
                self._broken = True
                raise
            if token == self._observation_id:
                self.ended_on_observation = True
                self._tokens.close()
                self._finish("stop")
                break
            delta = self._answer.push(token)
            if delta:
                self._streamed += delta
                return delta
        if self._tail:
            out, self._tail = self._tail, ""
            self._streamed += out
            return out
        raise StopIteration

    def cancel(self):
        """Ask generation to stop before the next token (thread-safe)."""
        self._cancel.set()

    def close(self):
        """Stop now, keeping what was generated (finish_reason 'cancelled')."""
        if self.finish_reason is None:
            self._tokens.close()
            self._finish("cancelled")

    def _finish(self, reason: str):
        self._tail += self._answer.finish()
        self.message = assemble(self.tok, self._answer.done, self.tools, observation=self.ended_on_observation)
        shown, content = self._streamed + self._tail, self.message.get("content") or ""
        if content.startswith(shown):  # e.g. a malformed call that was held back: show it after all
            self._tail += content[len(shown):]
        self.finish_reason = "tool_calls" if self.message.get("tool_calls") and reason == "stop" else reason

    def run(self) -> "ChatStream":
        for _ in self:
            pass
        return self

    @property
    def text(self) -> str:
        return self.message.get("content") or "" if self.message else ""

    @property
    def response(self):
        """THUDM habit: the reply text, or {"name", "arguments"} for a tool call ({"error", ...} if malformed);
        ChatGLM3's original names the arguments "parameters", which is there too."""
        if self.message is None:
            return None
        if self.message.get("tool_calls"):
            fn = self.message["tool_calls"][0]["function"]
            call = {"name": fn["name"], "arguments": json.loads(fn["arguments"])}
            return dict(call, parameters=call["arguments"]) if self.tok.chat_format == "chatglm3" else call
        if self.message.get("error"):
            return dict(self.message["error"])
        return self.message["content"] or ""

    @property
    def history(self):
        if self.message is None:
            return None
        if self._history_style == "pairs":
            pairs = [(m["content"], a["content"]) for m, a in zip(self.messages[::2], self.messages[1::2])]
            return pairs + [(self._query, self.text)]
        return self.messages + [self.message]

    @property
    def usage(self) -> dict:
        n = len(self._answer.ids)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": n,
                "total_tokens": len(self.prompt_ids) + n}


def _conversation(query_or_messages, history, role: str):
    """(messages, history_style, query) from the THUDM-style arguments."""
    if hasattr(query_or_messages, "apply_chat_template"):
        raise TypeError("model.chat takes no tokenizer argument (the model has its own): "
                        "model.chat(query, history=None, **generation)")
    style = "dicts"
    msgs: list[dict] = []
    if history:
        if all(isinstance(h, (tuple, list)) and len(h) == 2 for h in history):
            style = "pairs"  # ChatGLM-6B / ChatGLM2 habit: [(query, response), ...]
            for q, a in history:
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        elif all(isinstance(h, dict) for h in history):
            msgs = [dict(h) for h in history]
        else:
            raise TypeError("history must be a list of message dicts ({'role': ..., 'content': ...}) "
                            "or of (query, response) pairs")
    if isinstance(query_or_messages, str):
        if style == "pairs" and role != "user":
            raise ValueError("history given as (query, response) pairs only holds user turns")
        msgs.append({"role": role, "content": query_or_messages})
        return msgs, style, query_or_messages
    if not isinstance(query_or_messages, (list, tuple)) or not all(isinstance(m, dict) for m in query_or_messages):
        raise TypeError(f"chat takes a query string or a list of message dicts, got {type(query_or_messages).__name__}")
    return msgs + list(query_or_messages), "dicts", None


def stream_chat(model, query_or_messages, history=None, role: str = "user", tools=None, **gen) -> ChatStream:
    """Text deltas of the answer; the ChatStream then holds `.response`, `.history`, `.message`."""
    msgs, style, query = _conversation(query_or_messages, history, role)
    return ChatStream(model, msgs, tools=tools, history_style=style, query=query, **gen)


def chat(model, query_or_messages, history=None, role: str = "user", tools=None, **gen):
    """(response, history) the way THUDM's `model.chat` returns them."""
    s = stream_chat(model, query_or_messages, history, role=role, tools=tools, **gen).run()
    return s.response, s.history


def chat_completion(model, messages, tools=None, **gen) -> dict:
    """An OpenAI-shaped assistant message: content and/or tool_calls (and `error` for a malformed call)."""
    return ChatStream(model, messages, tools=tools, **gen).run().message
