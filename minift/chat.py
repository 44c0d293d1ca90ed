"""Chat conversations -> token ids with the loss on assistant turns only.

A conversation is a list of messages {"role": ..., "content": str}. It is rendered to one
string by a chat template and tokenised once, as transformers' `apply_chat_template` does.
A token is trained on (label = its id) when its characters overlap an assistant span;
every other token (system, user, the role headers) gets -100. An assistant span is the
assistant's text *and* the end-of-turn token the template writes after it, so the model
learns to stop; a template that writes no special token at the end of a span is refused.

Which template:
- `tokenizer.chat_template`: the Jinja text from tokenizer_config.json (or
  chat_template.jinja), rendered as transformers renders it: a sandboxed environment with
  trim_blocks and lstrip_blocks, the special tokens (bos_token, eos_token, ...) as
  variables, `raise_exception`, `strftime_now`, a JSON `tojson`, and the
  `{% generation %}...{% endgeneration %}` tag that marks what is trained. jinja2 is the
  optional `chat` extra, imported on first use.
- None: the built-in template for GPT-2-style models, which know only <|endoftext|>. It
  is rendered in Python here (no jinja2); BUILTIN_CHAT_TEMPLATE is the same template in
  Jinja, saved with a run so transformers renders the identical string:

      ### System:\\n{content}\\n\\n### User:\\n{content}\\n\\n### Assistant:\\n{content}<|endoftext|>\\n\\n

  each content stripped of surrounding whitespace; the generation prompt is
  "### Assistant:\\n".

Spans: a template with {% generation %} marks them itself. Without the tag, the span of
assistant message i is what rendering messages[:i+1] adds to rendering messages[:i] with
the generation prompt, less trailing whitespace: the content and the end-of-turn marker.
"""
from __future__ import annotations

import bisect
import functools
import json
import re
from datetime import datetime

from .formats import IGNORE_INDEX, DataError

BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + (message['role'] | capitalize) + ':\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ (message['content'] | trim) + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
BUILTIN_ROLES = ("system", "user", "assistant")
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use marks around {% generation %} output
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ----------------------------------------------------------------------------- rendering
def _render_builtin(messages: list[dict], add_generation_prompt: bool, eos: str):
    """BUILTIN_CHAT_TEMPLATE in Python -> (text, assistant spans as (start, end) characters)."""
    text, spans = "", []
    for i, m in enumerate(messages):
        if m["role"] not in BUILTIN_ROLES:
            raise DataError(f"message {i}: the built-in chat template knows the roles "
                            f"{', '.join(BUILTIN_ROLES)}; got {m['role']!r}")
        text += f"### {m['role'].capitalize()}:\n"
        content = m["content"].strip()
        if m["role"] == "assistant":
            content += eos
            spans.append((len(text), len(text) + len(content)))
        text += content + "\n\n"
    return text + ("### Assistant:\n" if add_generation_prompt else ""), spans


def _jinja2():
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise ImportError("this tokenizer has a chat template, which needs jinja2: "
                          "pip install 'minift[chat]'") from None
    return jinja2


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """Jinja environment as transformers builds it (trim_blocks, lstrip_blocks, sandboxed)."""
    jinja2 = _jinja2()

    class Generation(jinja2.ext.Extension):
        """{% generation %}body{% endgeneration %} renders body between two marks."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return _OPEN + caller() + _CLOSE

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    # json.dumps without HTML escaping (Jinja's own tojson escapes <, >, &)
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
        sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                    separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"the chat template does not parse: {e.message} (template line "
                        f"{e.lineno})") from None


def _render_jinja(template: str, messages, add_generation_prompt: bool, specials: dict):
    """Render with Jinja -> (text, spans of the {% generation %} blocks)."""
    jinja2, compiled = _jinja2(), _compile(template)
    try:
        marked = compiled.render(messages=messages, tools=None, documents=None,
                                 add_generation_prompt=add_generation_prompt, **specials)
    except jinja2.exceptions.TemplateError as e:  # raise_exception(...), an undefined name, ...
        raise DataError(f"the chat template failed: {e}") from None
    except (TypeError, ValueError, LookupError, AttributeError, RecursionError) as e:
        raise DataError(f"the chat template failed: {type(e).__name__}: {e}") from None
    text, spans = "", []
    for piece in re.split(f"([{_OPEN}{_CLOSE}])", marked):
        if piece == _OPEN:
            start = len(text)
        elif piece == _CLOSE:
            spans.append((start, len(text)))
        else:
            text += piece
    return text, spans


def _template(tokenizer) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    return None if t is None or t == BUILTIN_CHAT_TEMPLATE else t


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False):
    """Render a conversation -> (text, assistant spans as (start, end) character offsets)."""
    template = _template(tokenizer)
    if template is None:
        if tokenizer.eos_token is None:
            raise DataError("the built-in chat template ends assistant turns with eos; "
                            "the tokenizer has none")
        return _render_builtin(messages, add_generation_prompt, tokenizer.eos_token)
    for m in messages:
        if any(_OPEN in v or _CLOSE in v for v in m.values() if isinstance(v, str)):
            raise DataError("a message holds U+E000 or U+E001, which minift uses to mark "
                            "{% generation %} spans")
    specials = dict(tokenizer.special_tokens_map)
    text, spans = _render_jinja(template, messages, add_generation_prompt, specials)
    if _GENERATION_TAG.search(template) or add_generation_prompt:
        return text, spans
    spans = []
    for i, m in enumerate(messages):  # no tag: each assistant turn is what it adds to the text
        if m["role"] != "assistant":
            continue
        before = _render_jinja(template, messages[:i], True, specials)[0]
        upto = _render_jinja(template, messages[:i + 1], False, specials)[0]
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError(f"message {i}: the chat template does not render the conversation "
                            "turn by turn (a shorter conversation is not a prefix of the longer "
                            "one), so assistant turns cannot be found; mark them with "
                            "{% generation %} ... {% endgeneration %}")
        spans.append((len(before), max(len(before), len(upto.rstrip()))))
    return text, spans


# ----------------------------------------------------------------------------- tokens
def _encode_with_offsets(tokenizer, texts: list[str]):
    if hasattr(tokenizer, "encode_with_offsets"):  # minift.Tokenizer
        return tokenizer.encode_with_offsets(texts)
    out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)  # transformers
    return list(zip(out["input_ids"], out["offset_mapping"]))


def _special_ids(tokenizer) -> set[int]:
    if hasattr(tokenizer, "special_ids"):
        return tokenizer.special_ids
    return set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))


def assistant_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters overlap a span (transformers' rule), else 0."""
    mask = [0] * len(offsets)
    ends = [e for _, e in offsets]
    for start, end in spans:
        t = bisect.bisect_right(ends, start)  # first token ending after the span starts
        while t < len(offsets) and offsets[t][0] < end:
            if offsets[t][1] > start:
                mask[t] = 1
            t += 1
    return mask


def _check_end_tokens(ids, offsets, spans, specials: set[int], tokenizer, where: str) -> None:
    ends = [e for _, e in offsets]
    for start, end in spans:
        last = bisect.bisect_left(ends, end)  # the token holding the span's last character
        if end <= start or last >= len(ids) or ids[last] not in specials:
            tail = tokenizer.decode(ids[max(0, last - 3):last + 1]) if last < len(ids) else ""
            raise DataError(f"{where}: the chat template writes no end-of-turn token (a special "
                            f"token such as eos) at the end of an assistant turn (it ends "
                            f"{tail!r}), so the model would never learn to stop")


def chat_examples(tokenizer, conversations: list[list[dict]], wheres: list[str],
                  max_length: int | None = None) -> list[dict]:
    """Conversations -> {"input_ids", "labels"}: labels are the ids on assistant spans, -100
    elsewhere. Longer than max_length: the first max_length tokens, if one is trained on."""
    rendered = []
    for conv, where in zip(conversations, wheres):
        try:
            rendered.append(render(tokenizer, conv))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    encoded = _encode_with_offsets(tokenizer, [text for text, _ in rendered])
    specials, examples = _special_ids(tokenizer), []
    for (text, spans), (ids, offsets), where in zip(rendered, encoded, wheres):
        _check_end_tokens(ids, offsets, spans, specials, tokenizer, where)
        mask = assistant_mask(offsets, spans)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        if max_length is not None and not any(mask[:max_length]):
            raise DataError(f"{where}: the first assistant token is at position {mask.index(1)}, "
                            f"beyond max_length={max_length}; nothing would be trained")
        examples.append({"input_ids": list(ids[:max_length]), "labels": labels[:max_length]})
    return examples


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The tokens a model continues to answer: the conversation and the generation prompt,
    exactly the prefix its training examples had before an assistant turn."""
    text, _ = render(tokenizer, messages, add_generation_prompt=True)
    return _encode_with_offsets(tokenizer, [text])[0][0]


def end_of_turn_id(tokenizer) -> int:
    """The token the template ends an assistant turn with (eos, <|im_end|>, ...): generation
    stops there."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text, spans = render(tokenizer, probe)
    (ids, offsets), = _encode_with_offsets(tokenizer, [text])
    _check_end_tokens(ids, offsets, spans, _special_ids(tokenizer), tokenizer, "chat template")
    return ids[bisect.bisect_left([e for _, e in offsets], spans[-1][1])]


def eval_record(tokenizer, messages: list[dict]) -> dict:
    """A chat test record -> {"prompt", "completion"}: the last assistant turn is the
    reference, the rendered conversation before it (with the generation prompt) the prompt."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise DataError("a chat test record needs an assistant turn (the reference)")
    prompt, _ = render(tokenizer, messages[:last], add_generation_prompt=True)
    return {"prompt": prompt, "completion": messages[last]["content"]}
