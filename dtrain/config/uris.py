"""What a storage URI must look like, checked before any filesystem is touched.

fsspec reads anything without a known ``scheme://`` prefix as a local path, so ``s3://`` (bucket
forgotten), ``gs://`` or ``s3:bucket/run`` would quietly become folders named ``s3:`` under the working
directory and a user would believe their checkpoints were on S3. Anything shaped like a URL must
therefore be a complete one: a known protocol, ``//``, and a bucket or host.
"""

from __future__ import annotations

import re

import fsspec

# two or more letters before the colon: "C:\\ckpt" is a Windows drive, not a scheme
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]+):(?P<rest>.*)$")
_NO_LOCATION = {"memory"}  # protocols whose URIs need no bucket or host
_LOCAL = {"file", "local"}
EXAMPLES = "a local path, file:///abs/path, s3://BUCKET/PATH, gs://BUCKET/PATH or memory://NAME"


def uri_problems(key: str, uri: str) -> list[str]:
    """Why ``uri`` (the value of config key ``key``) is not a usable storage location, one line each."""
    match = _SCHEME.match(uri)
    if match is None:
        return []  # a local path
    scheme, rest = match["scheme"].lower(), match["rest"]
    if not rest.startswith("//"):
        return [f"{key}={uri} looks like a URL but has no '//' after '{scheme}:'; write {scheme}://BUCKET/PATH "
                f"(or a local path without ':')"]
    if scheme not in fsspec.available_protocols():
        return [f"{key}={uri} uses the unknown protocol {scheme}://; use {EXAMPLES}"]
    location = rest[2:]
    if scheme in _LOCAL:
        return [] if location.strip("/") else [f"{key}={uri} names no path; write file:///ABSOLUTE/PATH"]
    host = location.split("/", 1)[0].rpartition("@")[2]  # userinfo is not the bucket
    if scheme not in _NO_LOCATION and not host:
        return [f"{key}={uri} names no bucket or host; write {scheme}://BUCKET/PATH"]
    return []
