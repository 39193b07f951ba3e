"""``s3://BUCKET/KEY``: where the object is and how each request is signed.

It owns the AWS configuration chain, taken from botocore (no boto3): credentials, region and
profile from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_REGION`` ...),
``~/.aws/config`` and ``~/.aws/credentials`` (or ``AWS_CONFIG_FILE`` /
``AWS_SHARED_CREDENTIALS_FILE``), SSO and assume-role profiles; the endpoint from ``-o
endpoint=``, else ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, or the profile's
``endpoint_url``, else AWS's own. Requests are signed with botocore's SigV4 signer for S3
(``S3SigV4Auth``) and sent by the HTTP device like any range GET.

The EC2 instance metadata service is asked for credentials only when
``AWS_EC2_METADATA_DISABLED=false`` is set: botocore would otherwise try a link-local address
on every machine without credentials, and a mount must not wait on that (or send it) unasked.

Sync code: ``resolve`` reads files and may call STS for an assume-role profile, so the caller
runs it in a worker thread.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

import botocore.session  # type: ignore[import-untyped]
from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError  # type: ignore[import-untyped]

from asyncfs.errors import ImageError

_BUCKET_DNS = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
DEFAULT_REGION = "us-east-1"


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/KEY`` -> (bucket, key); ImageError if either is missing."""
    parts = urllib.parse.urlsplit(url)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if parts.scheme != "s3" or not bucket or not key:
        raise ImageError(f"{url}: expected s3://BUCKET/KEY")
    return bucket, key


@dataclass
class S3Target:
    """The object's HTTP(S) URL, its signing region, and the signer (None: anonymous)."""

    url: str
    region: str
    endpoint: str | None
    signer: S3Signer | None


class S3Signer:
    """``sign(url, headers) -> headers``: SigV4 for a GET of ``url``, with fresh credentials
    each time (botocore refreshes temporary ones as they near expiry)."""

    def __init__(self, credentials: Any, region: str) -> None:
        self._credentials = credentials
        self.region = region

    def __call__(self, url: str, headers: dict[str, str]) -> dict[str, str]:
        frozen = self._credentials.get_frozen_credentials()
        req = AWSRequest(method="GET", url=url, headers=dict(headers))
        S3SigV4Auth(frozen, "s3", self.region).add_auth(req)
        return {k: str(v) for k, v in req.headers.items()}


def _endpoint(session: botocore.session.Session, option: str | None) -> str | None:
    if option:
        return option
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        scoped = session.get_scoped_config()
    except BotoCoreError:
        return None
    value = scoped.get("endpoint_url")
    services = scoped.get("s3")
    if isinstance(services, dict) and services.get("endpoint_url"):
        value = services["endpoint_url"]
    return str(value) if value else None


def object_url(bucket: str, key: str, region: str, endpoint: str | None) -> str:
    """Path-style under a custom endpoint (what S3-compatible stores expect); virtual-hosted
    on AWS where the bucket name allows it."""
    qkey = urllib.parse.quote(key, safe="/~")
    if endpoint:
        if "://" not in endpoint:
            endpoint = "https://" + endpoint
        return f"{endpoint.rstrip('/')}/{bucket}/{qkey}"
    if _BUCKET_DNS.match(bucket):
        return f"https://{bucket}.s3.{region}.amazonaws.com/{qkey}"
    return f"https://s3.{region}.amazonaws.com/{bucket}/{qkey}"


def resolve(url: str, endpoint: str | None = None) -> S3Target:
    """The target of ``s3://BUCKET/KEY`` under the standard configuration chain."""
    bucket, key = parse_s3_url(url)
    try:
        session = botocore.session.Session()
        if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "false":
            resolver = session.get_component("credential_provider")
            resolver.remove("iam-role")
        region = session.get_config_variable("region") or DEFAULT_REGION
        end = _endpoint(session, endpoint)
        credentials = session.get_credentials()
    except BotoCoreError as err:
        raise ImageError(f"{url}: AWS configuration: {err}") from None
    signer = S3Signer(credentials, region) if credentials is not None else None
    return S3Target(object_url(bucket, key, region, end), region, end, signer)
