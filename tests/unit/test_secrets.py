"""Credentials are redacted recursively from everything dtrain writes or prints: files, logs, wandb, errors, CLI."""

from __future__ import annotations

import os

import pytest

from dtrain.checkpoint.storage import Storage, StorageError
from dtrain.config.compose import config_hash, redact_override, redacted_yaml
from dtrain.config.errors import ConfigError
from dtrain.config.secrets import is_secret_key, redact, redact_text
from dtrain.config.validate import load_config
from tests.unit.test_checkpoint_unit import _train  # the tiny one-process run

# every secret below must never show up anywhere; each sits somewhere a flat redaction would miss
SECRETS = ("nested-secret-1", "proxy-pw-2", "endpoint-pw-3", "camel-secret-4", "list-secret-5", "uri-pw-6",
           "creds-secret-7")
NESTED_OPTIONS = [
    "+checkpoint.storage_options.client_kwargs={aws_secret_access_key: nested-secret-1, region_name: eu-west-1}",
    "+checkpoint.storage_options.config_kwargs={signature_version: s3v4, "
    "proxies: {https: 'http://proxyuser:proxy-pw-2@proxy:3128'}}",
    "+checkpoint.storage_options.endpoint_url=http://AKIAUSER:endpoint-pw-3@minio:9000",
    "+checkpoint.storage_options.apiKey=camel-secret-4",
    "+checkpoint.storage_options.extra=[{session_token: list-secret-5}, {name: plain-name}]",
]


def _leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [s for s in SECRETS if s.encode() in data]


@pytest.mark.parametrize("key", ["aws_secret_access_key", "apiKey", "APIKey", "private_key_id", "session_token",
                                 "password", "passwd", "credentials", "token", "key", "secret", "X-Amz-Signature",
                                 "client-secret", "a.b.refreshToken", "aws_access_key_id", "AccountKey"])
def test_keys_that_name_a_secret(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["sort_keys", "sample_tokens", "trainer.sample_tokens", "max_tokens", "keep_last",
                                 "checkpoint.keep_last", "kv_heads", "client_kwargs", "config_kwargs", "key_prefix",
                                 "endpoint_url", "token_uri", "signature_version", "eos_token", "pad_token_id",
                                 "region_name", "anon"])
def test_ordinary_keys_are_not_secrets(key):
    assert not is_secret_key(key)


def test_redact_is_recursive_over_dicts_lists_and_tuples():
    data = {"checkpoint": {"uri": "s3://AKIA:uri-pw-6@host/run", "keep_last": 2, "storage_options": {
        "client_kwargs": {"aws_secret_access_key": "nested-secret-1", "region_name": "eu-west-1"},
        "config_kwargs": {"proxies": {"https": "http://u:proxy-pw-2@proxy:3128"}},
        "endpoint_url": "http://AKIA:endpoint-pw-3@minio:9000",
        "deeper": [{"layer": ({"apiKey": "camel-secret-4"},)}, {"session_token": "list-secret-5"}],
        "credentials": {"type": "service_account", "anything": "creds-secret-7"},
        "token": None}}, "trainer": {"sample_tokens": 200}}
    out = redact(data)
    assert not _leaks(repr(out))
    options = out["checkpoint"]["storage_options"]
    assert options["client_kwargs"] == {"aws_secret_access_key": "***", "region_name": "eu-west-1"}
    assert options["endpoint_url"] == "http://***@minio:9000" and out["checkpoint"]["uri"] == "s3://***@host/run"
    assert options["deeper"][0]["layer"] == ({"apiKey": "***"},)  # tuples stay tuples
    assert options["credentials"] == "***" and options["token"] is None  # no token set stays visible
    assert out["trainer"] == {"sample_tokens": 200} and out["checkpoint"]["keep_last"] == 2
    assert data["checkpoint"]["storage_options"]["client_kwargs"]["aws_secret_access_key"] == "nested-secret-1"


@pytest.mark.parametrize("text, expected", [
    ("checkpoint.uri=s3://AKIA:uri-pw-6@host/x is not usable", "checkpoint.uri=s3://***@host/x is not usable"),
    ("+checkpoint.storage_options.client_kwargs={aws_secret_access_key: nested-secret-1, region_name: eu}",
     "+checkpoint.storage_options.client_kwargs={aws_secret_access_key: ***, region_name: eu}"),
    ("Storage('memory://x', options={'secret': 'camel-secret-4', 'anon': False})",
     "Storage('memory://x', options={'secret': '***', 'anon': False})"),
    ("GET https://h/o?X-Amz-Credential=AKIA&X-Amz-Signature=list-secret-5&y=2",
     "GET https://h/o?X-Amz-Credential=***&X-Amz-Signature=***&y=2"),
    ("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=creds-secret-7;EndpointSuffix=x",
     "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=***;EndpointSuffix=x"),
    ("trainer.sample_tokens=0 checkpoint.keep_last=2", "trainer.sample_tokens=0 checkpoint.keep_last=2"),
])
def test_redact_text(text, expected):
    assert redact_text(text) == expected


def test_overrides_are_redacted_inside_their_values():
    assert redact_override("+checkpoint.storage_options.secret=abc") == "+checkpoint.storage_options.secret=***"
    assert [_leaks(redact_override(o)) for o in NESTED_OPTIONS] == [[]] * len(NESTED_OPTIONS)
    assert redact_override("trainer.sample_tokens=7") == "trainer.sample_tokens=7"


def test_redacted_yaml_and_config_hash_ignore_secrets():
    base = ["run.name=t", "checkpoint.uri=memory://AKIA:uri-pw-6@bucket/run"]
    cfg = load_config([*base, *NESTED_OPTIONS], 1)
    text = redacted_yaml(cfg)
    assert not _leaks(text)
    assert "sample_tokens: 200" in text and "keep_last: 2" in text and "region_name: eu-west-1" in text
    assert "memory://***@bucket/run" in text and "http://***@minio:9000" in text
    other = [*base, *NESTED_OPTIONS]
    for secret in SECRETS:
        other = [o.replace(secret, f"another-{secret}") for o in other]
    other = load_config(other, 1)
    assert config_hash(other) == config_hash(cfg)  # the hash is no fingerprint of a credential ...
    changed = load_config([*base, *NESTED_OPTIONS, "checkpoint.keep_last=3"], 1)
    assert config_hash(changed) != config_hash(cfg)  # ... but still tells configs apart
    region = load_config([*base, *[o.replace("eu-west-1", "us-east-1") for o in NESTED_OPTIONS]], 1)
    assert config_hash(region) != config_hash(cfg)


def test_errors_reprs_and_log_lines_are_redacted(caplog):
    import logging

    from dtrain.logs import RedactingFormatter

    error = ConfigError(["checkpoint.uri=s3://AKIA:uri-pw-6@b/x is not usable", "secret=camel-secret-4"])
    assert not _leaks(error.render() + str(error)) and "s3://***@b/x" in error.render()
    assert not _leaks(str(StorageError("checkpoint.uri=s3://AKIA:uri-pw-6@b/x: broken")))
    storage = Storage(f"memory://AKIA:uri-pw-6@dtrain-repr-{os.getpid()}",
                      {"client_kwargs": {"aws_secret_access_key": "nested-secret-1"}, "key": "camel-secret-4"})
    assert not _leaks(repr(storage)) and "memory://***@" in repr(storage)
    record = logging.LogRecord("dtrain.x", logging.INFO, __file__, 1, "saving to %s with %s", (
        storage.url("step_1"), {"password": "list-secret-5"}), None)
    line = RedactingFormatter("%(message)s").format(record)
    assert not _leaks(line) and line.startswith("saving to memory://***@")


def test_a_training_run_writes_logs_and_prints_no_secret(tmp_path, capsys, monkeypatch):
    """A real run with userinfo in checkpoint.uri (memory:// accepts it) and nested storage options: run folder,
    step config, wandb offline files, log lines, a ConfigError and ``dtrain ckpt`` stay clean."""
    from dtrain.checkpoint.cli import main as ckpt_main

    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = f"memory://AKIAUSER:uri-pw-6@dtrain-secrets-{os.getpid()}/run"
    run_dir = tmp_path / "run"
    options = [f"checkpoint.uri={uri}", "checkpoint.interval_steps=2", *NESTED_OPTIONS]
    assert _train(run_dir, 2, [*options, "logging.wandb.enabled=true", "logging.wandb.mode=offline",
                               "run.name=secrets"]) == 0
    config, overrides = (run_dir / "config.yaml").read_text(), (run_dir / "overrides.txt").read_text()
    step_config = Storage(uri).read_bytes("step_00000002/config.yaml").decode()
    for text in (config, overrides, step_config):
        assert not _leaks(text)
        assert "region_name: eu-west-1" in text and "sample_tokens" in text and "memory://***@" in text
    assert "sample_tokens: 0" in config and "keep_last: 2" in config
    wandb_files = [p for p in (run_dir / "wandb").rglob("*") if p.is_file()]
    wandb_bytes = b"".join(p.read_bytes() for p in wandb_files)
    assert b"eu-west-1" in wandb_bytes and not _leaks(wandb_bytes)  # the config was sent, redacted
    logged = capsys.readouterr()
    assert "committed memory://***@" in logged.err and not _leaks(logged.out + logged.err)

    assert _train(run_dir, 4, [*options, "checkpoint.resume=5"]) == 2  # a ConfigError quoting the URI
    assert ckpt_main(["ls", uri]) == 0
    assert ckpt_main(["inspect", f"{uri}/step_00000002", "trainer.sample_prompt=http://u:proxy-pw-2@h/"]) == 0
    printed = capsys.readouterr()
    assert "no committed step 5 under memory://***@" in printed.err and "step_00000002" in printed.out
    assert "trainer.sample_prompt" in printed.out and "http://***@h/" in printed.out
    assert not _leaks(printed.out + printed.err)
