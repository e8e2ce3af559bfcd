"""Redaction of credentials: the one place that decides what a secret is and how it is hidden.

Everything dtrain writes or prints that may hold config or URIs goes through here: the run folder's
``config.yaml`` and ``overrides.txt``, every checkpoint step's ``config.yaml``, the wandb config, the
dtrain log handler, ``ConfigError`` messages, ``Storage`` reprs and errors, and ``dtrain ckpt``
output. It lives in the config layer because config is read by every layer and imports none of them.

Which keys are secret (``is_secret_key``) is decided on the key's words, not on substrings, so
``aws_secret_access_key``, ``apiKey``, ``session_token`` and ``private_key_id`` are secret while
``sample_tokens``, ``max_tokens``, ``sort_keys``, ``key_prefix`` and ``keep_last`` are not:

- a word containing ``secret``, ``password``, ``passwd``, ``passphrase`` or ``credential``
  (``client_secret``, ``dbpassword``, ``credentials``), or one of ``pwd``, ``apikey``, ``accesskey``,
  ``privatekey``, ``accesstoken``, ``authtoken``;
- or a key whose last word is ``key``, ``token``, ``auth``, ``authorization``, ``signature`` or ``sig``,
  optionally followed by ``id`` (``key``, ``api_key``, ``access_key_id``, ``refresh_token``,
  ``X-Amz-Signature``). Only the last word counts because it names what the value is: ``key_prefix``
  is a prefix, ``token_uri`` a URL, ``signature_version`` a protocol version. Plurals
  (``tokens``, ``keys``) are counts, lists or flags, not credentials. Tokenizer special tokens
  (``eos_token``, ``pad_token``, ...) are vocabulary, not credentials.

When in doubt a key is redacted: a value hidden by mistake costs a line of a written config (and its
share of the config hash), a leaked credential costs a rotation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

MASK = "***"

# any word containing one of these names a secret: client_secret, dbpassword, credentials
SECRET_FRAGMENTS = ("secret", "password", "passwd", "passphrase", "credential")
# words that are secrets by themselves (lowercase concatenations that the word split cannot see into)
SECRET_WORDS = frozenset({"pwd", "apikey", "accesskey", "privatekey", "accesstoken", "authtoken"})
# the last word of a key that holds a credential (optionally followed by "id"): signature_version is not one
SECRET_NOUNS = frozenset({"key", "token", "auth", "authorization", "signature", "sig"})
# tokenizer vocabulary: eos_token is a string like "<|endoftext|>", not a credential
SPECIAL_TOKENS = frozenset({"eos", "bos", "pad", "unk", "sep", "cls", "mask"})

_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#@]+(?:@[^\s/?#@]+)*)@")
_KEY = r"[A-Za-z_][\w.\-]*"
_VALUE = r"'[^']*'|\"[^\"]*\"|\{[^{}]*\}|\[[^\[\]]*\]|[^\s&;,'\"(){}\[\]]+"
# key=value: Hydra overrides, query strings, connection strings, keyword-argument reprs
_ASSIGNMENT = re.compile(rf"(?<![\w.\-])(?P<key>{_KEY})(?P<sep>=)(?P<value>{_VALUE})")
# 'key': value (dict and JSON reprs), or key: value in a flow mapping {a: 1, key: 2} or at a line's start (YAML)
_MAPPING = re.compile(rf"(?P<lead>['\"]|(?:^|[{{,])[ \t]*(?:-[ \t]+)?)(?P<key>{_KEY})(?P<close>['\"]?)"
                      rf"(?P<sep>[ \t]*:[ \t]*)(?P<value>{_VALUE})", re.MULTILINE)


def key_words(key: str) -> list[str]:
    """``aws_secret_access_key``, ``X-Amz-Security-Token``, ``a.b.apiKey``, ``APIKey`` -> lowercase words."""
    return [w.lower() for part in re.split(r"[^A-Za-z0-9]+", key) for w in _WORD.findall(part)]


def is_secret_key(key: object) -> bool:
    """Whether a mapping key (or a dotted config path) names a credential; see the module docstring."""
    words = key_words(str(key))
    if any(fragment in w for w in words for fragment in SECRET_FRAGMENTS) or SECRET_WORDS.intersection(words):
        return True
    if len(words) >= 2 and words[-1] == "id":
        words = words[:-1]
    if not words or words[-1] not in SECRET_NOUNS:
        return False
    return not (words[-1] == "token" and len(words) >= 2 and words[-2] in SPECIAL_TOKENS)


def _masked(value: str) -> str:
    """``'abc'`` -> ``'***'``; keeps the quotes so a repr still reads as one."""
    return f"{value[0]}{MASK}{value[0]}" if value[:1] in ("'", '"') else MASK


def _redact_pair(match: re.Match) -> str:
    """Mask a secret pair's value; look inside any other value (``url=http://h/x?token=abc``)."""
    head = match[0][:match.start("value") - match.start()]
    return head + (_masked(match["value"]) if is_secret_key(match["key"]) else redact_text(match["value"]))


def redact_text(text: str) -> str:
    """Free text with URL userinfo and the values of secret ``key=value`` / ``key: value`` pairs masked.

    Best effort (free text has no grammar): it covers what dtrain prints (URIs, Hydra overrides,
    dict reprs, YAML). Structured data goes through ``redact``, which is exact.
    """
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _ASSIGNMENT.sub(_redact_pair, text)
    return _MAPPING.sub(_redact_pair, text)


def redact(obj: Any) -> Any:
    """A copy of plain data (dicts, lists, tuples, or OmegaConf containers) safe to write or print.

    The value of a secret key is replaced by ``***`` whatever it holds (a nested dict too), at any
    depth; every other string goes through ``redact_text`` (URL userinfo, ``AccountKey=...`` inside a
    connection string). ``None`` and booleans carry no secret and are kept, so "no token set" stays visible.
    """
    if isinstance(obj, Mapping):
        return {k: (MASK if is_secret_key(k) and not _is_blank(v) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(redact(v) for v in obj)
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def _is_blank(value: Any) -> bool:
    return value is None or value == "" or isinstance(value, bool)


def redact_override(override: str) -> str:
    """``+checkpoint.storage_options.secret=abc`` -> ``+checkpoint.storage_options.secret=***``; a dict value
    (``client_kwargs={aws_secret_access_key: abc}``) and URL userinfo are redacted inside."""
    key, sep, _ = override.partition("=")
    if sep and is_secret_key(key.lstrip("+~")):
        return f"{key}={MASK}"
    return redact_text(override)


def redacted_container(cfg: DictConfig) -> dict:
    """The resolved config as plain data with every secret replaced by ``***`` (safe to write or upload)."""
    return redact(OmegaConf.to_container(cfg, resolve=True))


def redacted_yaml(cfg: DictConfig) -> str:
    """The resolved, redacted config as YAML: what run folders and checkpoint steps store."""
    return OmegaConf.to_yaml(OmegaConf.create(redacted_container(cfg)))
