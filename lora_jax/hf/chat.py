"""Chat templates rendered as transformers renders them, and cut into replies.

`render` equals transformers' `apply_chat_template(messages, tokenize=False,
add_generation_prompt=...)` for the same template and special tokens: the
same sandboxed Jinja environment, filters, globals and extensions.
`segments` cuts that text into pieces and marks the assistant replies, for
training on replies only. jinja2 is imported only when a template is used.

>>> template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}\\n"
...             "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
>>> messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
>>> render(template, messages[:1], add_generation_prompt=True, special_tokens={"eos_token": "$"})
'<user>Hi$\\n<assistant>'
>>> segments(template, messages, special_tokens={"eos_token": "$"})
[('<user>Hi$\\n<assistant>', False), ('Hello$\\n', True)]
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from lora_jax import formats


def render(template: str, messages: Sequence[Mapping[str, Any]], *,
           add_generation_prompt: bool = False, special_tokens: Mapping[str, str] | None = None,
           name: str = "chat_template") -> str:
  """The conversation as `template` writes it.

  Args:
    template: the Jinja chat template.
    messages: dicts with string `role` and `content`.
    add_generation_prompt: end with the header of an assistant reply.
    special_tokens: the strings of the special tokens by key (`bos_token`,
      `eos_token`, ...), as the template sees them.
    name: where the template comes from (a checkpoint directory), for
      messages.

  Returns:
    The rendered text (with the template's own BOS, where it writes one).

  Raises:
    ValueError: malformed messages, an invalid template, or one that fails or
      refuses the conversation (`raise_exception`).
  """
  formats.check_messages(messages, name)
  return _render(template, list(messages), add_generation_prompt, special_tokens or {}, name)


def segments(template: str, messages: Sequence[Mapping[str, Any]], *,
             special_tokens: Mapping[str, str] | None = None,
             name: str = "chat_template") -> list[tuple[str, bool]]:
  """`render(template, messages)` cut into pieces, each marked True if trained on.

  A True piece is what the template writes for an assistant message after
  its header (the generation prompt): the reply and the end-of-turn marker.
  The pieces join to exactly `render(template, messages)`.

  Args:
    template: the Jinja chat template.
    messages: dicts with string `role` and `content`.
    special_tokens: as for `render`.
    name: as for `render`.

  Returns:
    (text, is_assistant_reply) pairs, none of them empty.

  Raises:
    ValueError: as `render`, or a template that does not render a
      conversation as the extension of its beginning (it rewrites earlier
      turns), so the replies cannot be located.
  """
  formats.check_messages(messages, name)
  messages, strings = list(messages), special_tokens or {}
  full = _render(template, messages, False, strings, name)
  pieces, done = [], 0
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    before = _render(template, messages[:i], True, strings, name)
    through = _render(template, messages[:i + 1], False, strings, name)
    if not (through.startswith(before) and full.startswith(through) and len(before) >= done):
      raise ValueError(f"{name}: the chat template does not render conversations "
                       f"incrementally (message {i} changes what comes before it), so "
                       "assistant tokens cannot be located")
    pieces += [(before[done:], False), (through[len(before):], True)]
    done = len(through)
  pieces.append((full[done:], False))
  return [(text, trained) for text, trained in pieces if text]


def _render(template: str, messages: list, add_generation_prompt: bool,
            special_tokens: Mapping[str, str], name: str) -> str:
  compiled = _compile(template, name)
  try:
    return compiled.render(messages=messages, tools=None, documents=None,
                           add_generation_prompt=add_generation_prompt, **special_tokens)
  except ValueError:  # raise_exception's, already naming the template
    raise
  except Exception as error:  # noqa: BLE001 (a template's own errors are the user's input)
    raise ValueError(f"{name}: the chat template failed: {type(error).__name__}: "
                     f"{error}") from None


@functools.lru_cache(maxsize=16)
def _compile(source: str, name: str):
  """The template compiled as transformers' `_compile_jinja_template` does."""
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers' reply marker, kept as its body."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise ValueError(f"{name}: the chat template refused the conversation: {message}")

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(format):  # noqa: A002 (the name templates use)
    return datetime.now().strftime(format)

  environment = ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
  environment.filters["tojson"] = tojson
  environment.globals["raise_exception"] = raise_exception
  environment.globals["strftime_now"] = strftime_now
  try:
    return environment.from_string(source)
  except jinja2.TemplateSyntaxError as error:
    raise ValueError(f"{name}: the chat_template is not a valid Jinja template: {error}") from None
