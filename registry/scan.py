"""A scan of a server's tool definitions, prompts, resources and instructions for tool poisoning
(OWASP MCP Top 10, MCP03).

A client puts every tool definition it lists in front of the model, word for word, while a
person sees at most a name and the first line. A poisoned definition uses that gap: it speaks
to the model (hidden instructions), hides text from the person (invisible or look-alike
characters), asks the model to hand over private data (exfiltration), or redefines another
server's tools (shadowing). This scan reads every string of every definition (descriptions,
titles, and the descriptions, defaults, enums and examples nested in the input and output
schemas, and the keys too) and reports each cue with the tool and the JSON path it was found at.
The server's other offerings reach the model the same way and are read alike: every string of its
prompts, resources and resource templates, its `initialize` instructions, and the text its
argument-free prompts render and its resources hold (the trial run's samples); their findings
name them as `prompt:<name>`, `resource:<uri>`, `template:<uriTemplate>` or `server:instructions`.

It judges one listing. A rug pull (a definition that changes after approval) is caught by the
pins of `registry.definitions`, which the gateway compares at run time.

The patterns are tuned for precision: ordinary descriptions, such as those of the built-in
servers, give no finding. A finding is a reason for a person to read the definition, not a proof.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from registry.definitions import INSTRUCTIONS_PIN, KINDS, pin_key
from registry.scan_unicode import confusable, describe, invisible, quote

CHECKS: tuple[str, ...] = ("hidden-instructions", "invisible-unicode", "confusable-unicode", "exfiltration", "shadowing")


@dataclass(frozen=True)
class Finding:
    check: str
    tool: str
    path: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class _Text:
    """One string of a definition: a value, or a key of an object (property names)."""

    path: str
    text: str
    is_key: bool

    @property
    def field(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def is_prose(self) -> bool:
        """Words written for a reader, as opposed to values (defaults, enums, examples, patterns)."""
        return not self.is_key and self.field in ("description", "title", "instructions")


def scan_tools(
    prefix: str, tools: list[dict[str, Any]], others: Mapping[str, str], offerings: Mapping[str, Any] | None = None
) -> list[Finding]:
    """Findings for the tools a server listed, and for its other offerings.

    `prefix` is the server's own tool prefix; `others` maps the public names
    (`<prefix>__<tool>`) of other approved servers' tools to those servers' names;
    `offerings` is what the trial run recorded besides tools (`registry.trial.TrialResult.offerings`).
    """
    own_names = {str(tool.get("name", "")) for tool in tools}
    own_parameters = {name for tool in tools for name in _parameter_names(tool)}
    context = _Context(prefix, own_names, own_parameters, others)
    findings: list[Finding] = []
    for tool in tools:
        findings += _scan_tool(tool, context)
    offerings = offerings or {}
    for kind in KINDS:
        for item in offerings.get(kind.listing) or []:
            if isinstance(item, Mapping):
                findings += _scan_texts(pin_key(kind, item), list(_texts(item)), set(), context)
    if isinstance(instructions := offerings.get("instructions"), str):
        findings += _scan_texts(INSTRUCTIONS_PIN, [_Text("instructions", instructions, False)], set(), context)
    for key, sample in (offerings.get("samples") or {}).items():
        if isinstance(sample, str):  # what the model reads; a link in it is no cue by itself
            findings += _scan_texts(key, [_Text("text", sample, False)], set(), context)
    return list(dict.fromkeys(findings))


class _Context:
    """What a definition is judged against: the server's own tools and everybody else's."""

    def __init__(self, prefix: str, own_names: set[str], own_parameters: set[str], others: Mapping[str, str]):
        self.prefix = prefix
        self.own_names = own_names
        self.own_public = {f"{prefix}__{name}" for name in own_names}
        self.own_words = own_names | self.own_public | own_parameters
        self.taken = dict(others)  # public names already in use, this server's own included
        # Other servers' tools: a collision with an own name is reported once, as such.
        self.others = {name: server for name, server in others.items() if name not in self.own_public}
        self.other_prefixes = {name.split("__", 1)[0] for name in self.others} - {prefix}
        # Another server's tool by its own name ('send_email'), for orders that leave the prefix out;
        # only names no English word could be ('search' or 'list' would be everywhere).
        self.other_bare: dict[str, str] = {}
        for public, server in self.others.items():
            bare = public.split("__", 1)[-1]
            if _looks_like_identifier(bare) and bare not in self.own_words:
                self.other_bare.setdefault(bare, server)

    def owner(self, word: str) -> str | None:
        return self.others.get(word) or self.other_bare.get(word)

    def is_other_tool(self, word: str, called_a_tool: bool) -> bool:
        """Whether `word`, named where a tool would be ("call X", "the X tool"), is a tool other
        than this server's own: a known one, or a snake_case name that is none of its own words."""
        if word in self.own_words or word.lower() in _NOT_TOOL_NAMES:
            return False
        return self.owner(word) is not None or called_a_tool or _looks_like_identifier(word)


def _scan_tool(tool: Mapping[str, Any], context: _Context) -> list[Finding]:
    name = str(tool.get("name", ""))
    texts = list(_texts(tool))
    parameters = _parameter_names(tool)
    findings: list[Finding] = []

    def found(check: str, text: _Text, message: str) -> None:
        findings.append(Finding(check, name, text.path, message))

    name_field = _Text("name", name, False)
    public = f"{context.prefix}__{name}"
    if public in context.taken:
        owner = quote(context.taken[public])
        found("shadowing", name_field, f"the public name {quote(public)} already belongs to server {owner}")
    if not name.isascii():
        odd = ", ".join(describe(ch) for ch in dict.fromkeys(name) if not ch.isascii())
        found("confusable-unicode", name_field, f"the tool name {quote(name)} must be ASCII but contains {odd}")

    return findings + _scan_texts(name, texts, parameters, context, name_has_own_rule=True)


def _scan_texts(
    label: str, texts: list[_Text], parameters: set[str], context: _Context, *, name_has_own_rule: bool = False
) -> list[Finding]:
    """Findings in the strings of one definition (or one text), named `label`."""
    findings: list[Finding] = []

    def found(check: str, text: _Text, message: str) -> None:
        findings.append(Finding(check, label, text.path, message))

    for text in texts:
        for message in invisible(text.text):
            found("invisible-unicode", text, message)
        if not (name_has_own_rule and text.path == "name" and not text.is_key):
            for message in confusable(text.text, text.is_key):
                found("confusable-unicode", text, message)
        if text.is_key:
            if _is_property_name(text.path) and SECRET_PARAMETER.search(_snake(text.text)):
                found("exfiltration", text, f"the parameter {quote(text.text)} asks for a secret, {SECRETS_BY_ENV}")
            continue
        for message in _hidden_instructions(text.text, context):
            found("hidden-instructions", text, message)
        for message in _exfiltration(text, parameters):
            found("exfiltration", text, message)
        for message in _shadowing(text.text, context):
            found("shadowing", text, message)
    return findings


# --- walking a definition ----------------------------------------------------------------------


def _texts(value: Any, path: str = "") -> Iterator[_Text]:
    if isinstance(value, str):
        yield _Text(path, value, False)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            yield _Text(child, str(key), True)
            yield from _texts(item, child)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _texts(item, f"{path}[{i}]")


def _is_property_name(path: str) -> bool:
    parts = path.split(".")
    return len(parts) >= 2 and parts[-2] == "properties"


def _parameter_names(tool: Mapping[str, Any]) -> set[str]:
    schema = tool.get("inputSchema")
    properties = schema.get("properties") if isinstance(schema, Mapping) else None
    return {str(key) for key in properties} if isinstance(properties, Mapping) else set()


# --- hidden instructions -----------------------------------------------------------------------

_I = re.IGNORECASE

# (pattern, what it means); each message quotes what matched.
HIDDEN_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(
            r"\b(?:ignore|disregard|forget|override|bypass)\b(?:\s+\w+){0,3}?\s+"
            r"(?:previous|prior|earlier|preceding|above|former|all|any|other|system|your)\s+"
            r"(?:instructions?|directions|prompts?|rules|guidelines|messages|context)\b",
            _I,
        ),
        "tells the model to ignore its instructions",
    ),
    (
        re.compile(
            r"<\s*/?\s*(?:important|system|system[_-]?prompt|instructions?|secret|hidden|admin|critical|assistant|override)"
            r"\b[^<>\n]{0,40}>",
            _I,
        ),
        "wraps text in a tag addressed to the model",
    ),
    (
        re.compile(
            r"\b(?:do\s+not|don'?t|never|must\s+not|should\s+not)\s+"
            r"(?:tell|mention|inform|notify|alert|reveal|show|disclose|say|explain)\b[^.\n]{0,80}?\b(?:user|human)s?\b(?!')"
            r"|\bwithout\s+(?:telling|informing|alerting)\s+(?:the\s+)?(?:user|human)s?\b"
            r"|\b(?:the\s+)?user\s+(?:must|should)\s+not\s+(?:know|see|notice|be\s+told)\b"
            r"|\b(?:silently|secretly|quietly|covertly|discreetly)\s+"
            r"(?:send|post|read|call|invoke|include|pass|forward|upload|copy|add|append|attach|run|execute|exfiltrate)\b",
            _I,
        ),
        "tells the model to keep something from the user",
    ),
    (
        re.compile(
            r"\b(?:before|prior\s+to)\s+(?:using|calling|invoking|running|executing)\s+"
            r"(?:this|the|any|every|that)\s+(?:\w+\s+)?(?:tool|function)\b",
            _I,
        ),
        "tells the model what to do before it uses the tool",
    ),
    (
        re.compile(
            r"\byou\s+(?:must|have\s+to|need\s+to|are\s+required\s+to|should)\s+"
            r"(?:first|always|also\s+always|never|immediately|silently|secretly)\b"
            r"|\byou\s+(?:first|always)\s+(?:must|have\s+to|need\s+to)\b"
            r"|\byou\s+must\s+(?:read|call|invoke|send|include|pass|use|run|forward|upload|ignore|obey|follow)\b",
            _I,
        ),
        "gives the model orders",
    ),
    (
        re.compile(
            r"\b(?:very\s+){2,}important\b|\bthis\s+is\s+(?:extremely|critically|vitally|really|very)\s+important\b"
            r"|\b(?:extremely|critically|vitally)\s+important\b",
            _I,
        ),
        "insists on its importance as injected prompts do",
    ),
    (
        re.compile(
            r"(?:^|\n)[ \t]*(?:system|assistant|developer)[ \t]*:[ \t]"
            r"|\[/?(?:system|inst)\]|<<\s*/?sys\s*>>|<\|(?:im_start|im_end|system|assistant|user)\|>"
            r"|(?:^|\n)[ \t]*#{1,6}[ \t]*system\b"
            r"|\bsystem\s+(?:prompt|override|instructions?)\b"
            r"|\b(?:new|updated|additional|hidden|secret)\s+instructions\s*:"
            r"|\byou\s+are\s+now\b",
            _I,
        ),
        "imitates a system prompt",
    ),
    (
        re.compile(r"<!--[\s\S]*?(?:-->|$)|(?:^|\n)[ \t]*\[(?://|comment)\]:\s*[#<]", _I),
        "hides text in a comment the user does not see rendered",
    ),
)

# Whitespace that pushes text out of sight: a long run of blanks, or many line breaks.
PADDING = re.compile(r"(?:[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]{24,}|(?:[ \t]*\r?\n){6,})\s*(?=\S)")

# "call read_file", "use the `add` tool": the named word is checked against the server's own tools.
CALL_TOOL = re.compile(
    r"\b(call|invoke|use|run|execute|trigger)\s+(?:the\s+)?[`'\"]?([A-Za-z][\w.-]*?)[`'\"]?"
    r"(\s+(?:tool|function)\b)?(?=[\s`'\",.;:)!?]|$)",
    _I,
)
# What follows "run" or "execute" is often a program or a script ("run make_release.py"), not a tool.
_PROGRAM_VERBS = {"run", "execute"}
_FILE_NAME = re.compile(r"\.(?:py|sh|js|ts|json|ya?ml|toml|txt|md|cfg|ini|csv|sql)$", _I)
_NOT_TOOL_NAMES = {
    "a", "an", "the", "this", "that", "these", "those", "it", "any", "other", "another", "each", "every",
    "same", "following", "next", "previous", "right", "appropriate", "relevant", "correct", "given",
    "corresponding", "specified", "new", "old", "first", "last", "one", "your", "its", "their",
}


def _hidden_instructions(text: str, context: _Context) -> list[str]:
    messages = []
    for pattern, meaning in HIDDEN_PATTERNS:
        if match := pattern.search(text):
            messages.append(f"{meaning}: {quote(match.group(0).strip())}")
    padding = PADDING.search(text)
    if padding:
        after = text[padding.end():]
        messages.append(f"hides text after {len(padding.group(0))} characters of blank space: {quote(after)}")
    for match in CALL_TOOL.finditer(text):
        verb, word, called_a_tool = match.group(1).lower(), match.group(2).rstrip(".-"), bool(match.group(3))
        if context.owner(word) is None and not called_a_tool and (verb in _PROGRAM_VERBS or _FILE_NAME.search(word)):
            continue
        if context.is_other_tool(word, called_a_tool):
            quoted = quote(match.group(0))
            messages.append(f"tells the model to call {quote(word)}, which is not one of this server's tools: {quoted}")
    return messages


# --- exfiltration ------------------------------------------------------------------------------

URL = re.compile(r"\b(?:https?|ftp|wss?|file)://[^\s'\"<>`)\]]+|\bwww\.[a-z0-9-]+\.[a-z]{2,}[^\s'\"<>`)\]]*", _I)
EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")

PRIVATE_FILES = re.compile(
    r"~/\.ssh\b|\.ssh/|\bid_(?:rsa|dsa|ecdsa|ed25519)\b|\b(?:known_hosts|authorized_keys)\b"
    r"|(?<![\w.])\.env\b(?![-/]|\.(?:example|sample|template|dist|defaults?)\b)|/etc/(?:passwd|shadow|sudoers)\b"
    r"|\bmcp\.json\b|\bclaude_desktop_config(?:\.json)?\b|~/\.cursor\b"
    r"|~/\.(?:aws|kube|docker|gnupg|azure|netrc|npmrc|pypirc|git-credentials|pgpass|bash_history|zsh_history)\b"
    r"(?:/[\w.-]*\w)?"
    r"|\.aws/credentials\b|\.git-credentials\b|\.netrc\b|\.pgpass\b|\bwallet\.dat\b",
    _I,
)

# Secrets and other private data a tool has no business asking the model for.
_SECRET = (
    r"(?:api[ _-]?keys?|secret[ _-]?keys?|private[ _-]?keys?|ssh[ _-]?keys?|passwords?(?![ _-]?reset)|passphrases?"
    r"|passwd|credentials?|session[ _-]?cookies?|cookies|seed[ _-]?phrases?|secrets"
    r"|(?:access|auth|authentication|bearer|refresh|session|api|oauth|github|gitlab|slack|personal[ _-]access)[ _-]?tokens?"
    r"|(?:conversation|chat|message)[ _-]history|system[ _-]prompt"
    r"|(?:previous|prior|entire|full)\s+(?:conversation|messages))"
)
SECRETS_BY_ENV = "which mcpfleet passes to servers only as environment variables"
SECRET_MENTION = re.compile(rf"\b{_SECRET}\b", _I)
_TAKE = (
    r"(?:include|pass|send|sent|append|attach|put|insert|copy|copie|extract|collect|dump|leak|embed|encode|share"
    r"|reveal|paste|forward|upload|post|exfiltrate|hand)(?:s|es|ed|d|ing)?"
)
SECRET_REQUEST = re.compile(
    rf"\b{_TAKE}\s+"
    r"(?:(?:the|your|their|its|any|all|every|his|her|my|our|stored|saved|local|user'?s?|current|full|entire)\s+){0,3}"
    rf"{_SECRET}\b",
    _I,
)
SECRET_PARAMETER = re.compile(
    r"(?:^|_)(?:password|passwd|passphrase|secret|secret_key|api_?key|access_?token|auth_?token|bearer_?token"
    r"|refresh_?token|session_?token|private_?key|ssh_?key|credentials?|cookie|session_?cookie)(?:$|_)"
)

_DESTINATION = (
    r"(?:(?:https?|ftp)://\S+|[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
    r"|\d{1,3}(?:\.\d{1,3}){3}|\+\d[\d\s().-]{6,}\d"
    r"|(?:this|that|the\s+following|our|my|an?\s+external|a\s+remote|the\s+attacker'?s?|external|remote)\s+(?:\w+\s+)?"
    r"(?:url|address|endpoint|server|webhook|host|domain|number|phone|inbox|account|e-?mail|channel))"
)
SEND_TO = re.compile(
    rf"\b(?:send|sent|post|upload|forward|transmit|exfiltrate|leak|copy|cc|bcc|e-?mail|mail|report|deliver|relay)"
    rf"(?:s|es|ed|ing)?\b[^.\n]{{0,80}}?\bto\s+{_DESTINATION}",
    _I,
)
# "base64 encode X and pass it": an order to encode, then to hand over. A format ("returns a
# base64-encoded PNG", "a hex-encoded color; add the #") is no order.
_ENCODING = r"(?:base-?64|hex|rot-?13)"
_HAND_OVER = r"(?:include|pass|append|attach|embed|hide|smuggle|put|add)\w*"
ENCODE_AND_PASS = re.compile(
    rf"\b{_ENCODING}[ -]?encode\b[^.\n]{{0,80}}\b{_HAND_OVER}\b"
    rf"|\bencode\b[^.\n]{{0,40}}\b(?:in|as|with|using|to)\s+{_ENCODING}\b[^.\n]{{0,80}}\b{_HAND_OVER}\b"
    rf"|\b(?:include|append|attach|embed|hide|smuggle)\w*\b[^.\n]{{0,80}}\b{_ENCODING}[ -]?encoded\b",
    _I,
)
SENTENCE = re.compile(r"[.!?](?=\s|$)|\n")


def _exfiltration(text: _Text, parameters: set[str]) -> list[str]:
    value = text.text
    messages: list[str] = []
    if text.is_prose:
        if url := URL.search(value):
            messages.append(f"mentions the address {quote(url.group(0))}, a place data could be sent to")
        if email := EMAIL.search(value):
            messages.append(f"mentions the e-mail address {quote(email.group(0))}")
    if private := list(dict.fromkeys(match.group(0) for match in PRIVATE_FILES.finditer(value))):
        files = ", ".join(quote(name) for name in private)
        messages.append(f"refers to private file{'s' if len(private) > 1 else ''} {files}")
    if request := _affirmed(SECRET_REQUEST, value):
        messages.append(f"asks the model to hand over a secret: {quote(request.group(0))}")
    if send := _affirmed(SEND_TO, value):
        messages.append(f"tells the model to send data somewhere: {quote(send.group(0))}")
    if encode := ENCODE_AND_PASS.search(value):
        messages.append(f"asks for data to be encoded and passed along: {quote(encode.group(0))}")
    if _is_parameter_description(text.path) and (secret := SECRET_MENTION.search(value)):
        messages.append(f"the parameter asks for {quote(secret.group(0))}, {SECRETS_BY_ENV}")
    if text.is_prose:
        messages += _smuggling_parameter(value, parameters)
    return messages


NEGATION = re.compile(r"\b(?:never|not|don'?t|no)\s+(?:\w+\s+)?$", _I)


def _affirmed(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    """The first match not negated by the words before it ("never include the API key")."""
    for match in pattern.finditer(text):
        if not NEGATION.search(text[: match.start()]):
            return match
    return None


def _is_parameter_description(path: str) -> bool:
    parts = path.split(".")
    return (
        len(parts) >= 3 and parts[0] == "inputSchema" and parts[-3] == "properties" and parts[-1] in ("description", "title")
    )


def _smuggling_parameter(value: str, parameters: set[str]) -> list[str]:
    """A sentence that sends private data into one of the tool's own parameters ("... as 'sidenote'")."""
    messages = []
    for sentence in SENTENCE.split(value):
        if not (PRIVATE_FILES.search(sentence) or SECRET_MENTION.search(sentence)):
            continue
        for parameter in sorted(parameters):
            into = rf"\b(?:as|in|into|inside|within|under|to)\s+(?:the\s+)?[`'\"]?{re.escape(parameter)}\b"
            if re.search(into, sentence, _I):
                messages.append(f"asks for private data in the parameter {quote(parameter)}: {quote(sentence.strip())}")
    return messages


# --- shadowing ---------------------------------------------------------------------------------

PUBLIC_NAME = re.compile(r"(?<![\w.-])([a-z][a-z0-9_]*?__[A-Za-z0-9][A-Za-z0-9_.-]*)")
_TOOL = r"[`'\"]?([A-Za-z][\w.-]*?)[`'\"]?(\s+(?:tool|function))?(?=[\s`'\",.;:)!?]|$)"
ORDER_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(
        rf"\bwhen(?:ever)?\s+(?:the\s+)?{_TOOL}\s+(?:tool\s+)?(?:is|gets|are)\s+"
        r"(?:called|used|invoked|run|executed|requested)",
        _I,
    ),
    re.compile(rf"\b(?:instead\s+of|rather\s+than)\s+(?:using\s+|calling\s+|invoking\s+)?(?:the\s+)?{_TOOL}", _I),
    re.compile(rf"\b(?:do\s+not|don'?t|never)\s+(?:use|call|invoke)\s+(?:the\s+)?{_TOOL}", _I),
    re.compile(rf"\b(?:before|after|while)\s+(?:using|calling|invoking)\s+(?:the\s+)?{_TOOL}", _I),
    re.compile(rf"\b(?:overrides?|replaces?|supersedes?|takes\s+precedence\s+over)\s+(?:the\s+)?{_TOOL}", _I),
)
OTHER_TOOLS = re.compile(
    r"\b(?:instead\s+of|rather\s+than|overrides?|replaces?|supersedes?|takes\s+precedence\s+over)\s+"
    r"(?:using\s+|calling\s+)?(?:any|all|every|the)\s+other\s+tools?\b"
    r"|\b(?:when|whenever|before|after)\s+(?:using|calling|invoking)\s+(?:any|all|every)\s+other\s+tools?\b",
    _I,
)


def _shadowing(text: str, context: _Context) -> list[str]:
    messages = []
    ordered: set[str] = set()
    for pattern in ORDER_PATTERNS:
        for match in pattern.finditer(text):
            word, called_a_tool = match.group(1).rstrip(".-"), bool(match.group(2))
            if not context.is_other_tool(word, called_a_tool):
                continue
            ordered.add(word)
            owner = context.owner(word)
            whose = f" of server {quote(owner)}" if owner else ""
            messages.append(f"gives orders about another tool, {quote(word)}{whose}: {quote(match.group(0))}")
    if match := OTHER_TOOLS.search(text):
        messages.append(f"gives orders about other tools: {quote(match.group(0))}")
    for match in PUBLIC_NAME.finditer(text):
        name = match.group(1).rstrip(".-")
        if name in ordered or name in context.own_public:
            continue
        if name in context.others:
            messages.append(f"mentions {quote(name)}, a tool of server {quote(context.others[name])}")
        elif name.split("__", 1)[0] in context.other_prefixes:
            messages.append(f"mentions {quote(name)}, a tool name in another server's namespace")
    return messages


# --- small helpers -----------------------------------------------------------------------------


def _looks_like_identifier(word: str) -> bool:
    """snake_case, as tools are named: no English word has an underscore ('JavaScript', 'UTF8',
    'built-in' and 'e.g.' do have the other marks of identifiers)."""
    return "_" in word.strip("_")


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower().replace("-", "_")
