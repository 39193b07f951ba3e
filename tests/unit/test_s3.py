"""``s3://`` (``asyncfs/io/s3.py``): the AWS configuration chain (environment, config and
credentials files, profiles, ``-o endpoint=``), the object's URL, and SigV4 signing checked by a
real S3 API: moto's standalone server on 127.0.0.1 with authentication on, which recomputes
each request's signature (a request signed with the wrong secret gets 403
SignatureDoesNotMatch).

Invariant tests run against the real code and against a deliberately broken variant named in
their docstring (``tests.mutants.breaks``), which must fail them.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from asyncfs.errors import ImageError
from asyncfs.io import s3 as s3_mod
from asyncfs.io.remote import RemoteOptions, open_remote
from asyncfs.io.s3 import object_url, parse_s3_url, resolve
from bench.remote_servers import Moto, moto, moto_missing
from tests.mutants import breaks

VARIANTS = ["kernel", "broken"]
BUCKET = "asyncfs-images"
DATA = random.Random(5).randbytes(300_000)
POLICY = json.dumps({"Version": "2012-10-17",
                     "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AWS setting from the machine: config and credentials files point into tmp_path."""
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_urls() -> None:
    assert parse_s3_url("s3://b/dir/disk.img") == ("b", "dir/disk.img")
    for bad in ("s3://bucket", "s3:///key", "http://b/k"):
        with pytest.raises(ImageError, match="expected s3://BUCKET/KEY"):
            parse_s3_url(bad)
    assert object_url("b-1", "a b/c+d.img", "eu-west-1", "http://127.0.0.1:9000/") == \
        "http://127.0.0.1:9000/b-1/a%20b/c%2Bd.img"
    assert object_url("my-bucket", "k", "eu-west-1", None) == \
        "https://my-bucket.s3.eu-west-1.amazonaws.com/k"
    assert object_url("my.bucket", "k", "us-east-1", None) == \
        "https://s3.us-east-1.amazonaws.com/my.bucket/k"
    assert object_url("b", "k", "us-east-1", "minio.local:9000").startswith("https://minio")


def test_environment_gives_credentials_region_and_endpoint(
    aws_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    t = resolve("s3://b/k")
    assert (t.region, t.url) == ("eu-central-1", "http://127.0.0.1:1/b/k")
    assert t.signer is not None
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    assert resolve("s3://b/k").url == "http://127.0.0.1:2/b/k"
    assert resolve("s3://b/k", "http://127.0.0.1:3").url == "http://127.0.0.1:3/b/k"


def test_profiles_in_config_and_credentials_files(
    aws_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (aws_env / "config").write_text(
        "[default]\nregion = us-west-2\n\n"
        "[profile lab]\nregion = ap-south-1\nendpoint_url = http://127.0.0.1:7\n")
    (aws_env / "credentials").write_text(
        "[default]\naws_access_key_id = AKIDDEF\naws_secret_access_key = s1\n\n"
        "[lab]\naws_access_key_id = AKIDLAB\naws_secret_access_key = s2\n")
    t = resolve("s3://bkt/k")
    assert (t.region, t.endpoint) == ("us-west-2", None)
    assert t.url == "https://bkt.s3.us-west-2.amazonaws.com/k"
    monkeypatch.setenv("AWS_PROFILE", "lab")
    t = resolve("s3://b/k")
    assert (t.region, t.url) == ("ap-south-1", "http://127.0.0.1:7/b/k")
    assert t.signer is not None
    signed = t.signer(t.url, {"Range": "bytes=0-9"})
    assert "Credential=AKIDLAB/" in signed["Authorization"]
    assert "range" in signed["Authorization"].split("SignedHeaders=")[1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_credentials_means_anonymous_without_asking_instance_metadata(
    variant: str, aws_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without credentials the requests go unsigned, and the EC2 metadata service (a
    link-local address) is never asked unless AWS_EC2_METADATA_DISABLED=false.

    Broken variant: the chain keeping botocore's instance-metadata provider."""
    breaks(variant, monkeypatch, s3_mod, "resolve", 'resolver.remove("iam-role")', "pass")
    asked: list[str] = []

    def fake_fetch(self: object, *a: object, **k: object) -> dict[str, str]:
        asked.append("imds")
        return {}

    import botocore.utils

    monkeypatch.setattr(botocore.utils.InstanceMetadataFetcher,
                        "retrieve_iam_role_credentials", fake_fetch)
    t = s3_mod.resolve("s3://b/k", "http://127.0.0.1:1")
    assert t.signer is None
    assert (asked == []) == (variant == "kernel")


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Moto, dict[str, str]]]:
    """moto with authentication after its first 3 actions: those create an IAM user with a
    policy and its access key, which every later request must be signed with."""
    why = moto_missing()
    if why:
        pytest.skip(why)
    import botocore.session

    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with moto(log, no_auth_actions=3) as srv:
        boot = botocore.session.Session()
        boot.set_credentials("AKIDBOOTSTRAP", "bootstrap")
        iam = boot.create_client("iam", endpoint_url=srv.endpoint, region_name="us-east-1")
        iam.create_user(UserName="asyncfs")
        iam.put_user_policy(UserName="asyncfs", PolicyName="all", PolicyDocument=POLICY)
        key = iam.create_access_key(UserName="asyncfs")["AccessKey"]
        env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
               "AWS_DEFAULT_REGION": "us-east-1"}
        sess = botocore.session.Session()
        sess.set_credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
        client = sess.create_client("s3", endpoint_url=srv.endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="dir/disk image.img", Body=DATA)
        yield srv, env


@pytest.mark.parametrize("variant", VARIANTS)
async def test_signed_range_gets_pass_the_servers_signature_check(
    variant: str, s3_server: tuple[Moto, dict[str, str]], aws_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A range GET signed by ``S3Signer`` is accepted (206) by an S3 API that checks SigV4.

    Broken variant: the signer returning the headers unsigned (403)."""
    breaks(variant, monkeypatch, s3_mod.S3Signer, "__call__",
           "return {k: str(v) for k, v in req.headers.items()}", "return dict(headers)")
    srv, env = s3_server
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t = resolve(f"s3://{BUCKET}/dir/disk image.img", srv.endpoint)
    assert t.signer is not None
    async with httpx.AsyncClient() as client:
        resp = await client.get(t.url, headers=t.signer(t.url, {"Range": "bytes=10-19"}))
    right = resp.status_code == 206 and resp.content == DATA[10:20]
    assert right == (variant == "kernel")


async def test_s3_object_reads_through_the_http_device(
    s3_server: tuple[Moto, dict[str, str]], aws_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, env = s3_server
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    dev = await open_remote(f"s3://{BUCKET}/dir/disk image.img",
                            RemoteOptions(endpoint=srv.endpoint))
    try:
        assert dev.size == len(DATA)
        assert dev.identity.etag
        assert await dev.read(100_000, 150_000) == DATA[100_000:250_000]
        assert await dev.read(len(DATA) - 3, 3) == DATA[-3:]
    finally:
        await dev.aclose()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(ImageError, match=r"403.*SignatureDoesNotMatch"):
        await open_remote(f"s3://{BUCKET}/dir/disk image.img",
                          RemoteOptions(endpoint=srv.endpoint, retries=1))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env["AWS_SECRET_ACCESS_KEY"])
    with pytest.raises(ImageError, match="404"):
        await open_remote(f"s3://{BUCKET}/missing.img",
                          RemoteOptions(endpoint=srv.endpoint, retries=1))
