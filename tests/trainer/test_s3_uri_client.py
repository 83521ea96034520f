"""S3 URIs and client settings: pure parsing/validation, plus a real client against SeaweedFS."""

from __future__ import annotations

import pytest

from kubetune_trainer.storage import (
    S3ConfigError,
    S3Uri,
    S3UriError,
    resolve_s3_settings,
    s3_client_from_env,
)


@pytest.mark.parametrize(
    ("text", "bucket", "key", "prefix"),
    [
        ("s3://bucket", "bucket", "", ""),
        ("s3://bucket/", "bucket", "", ""),
        ("s3://my.bucket-1/a/b", "my.bucket-1", "a/b", "a/b/"),
        ("s3://bucket/a/b/", "bucket", "a/b/", "a/b/"),
        ("  s3://bucket/x  ", "bucket", "x", "x/"),
    ],
)
def test_parse_valid(text: str, bucket: str, key: str, prefix: str) -> None:
    uri = S3Uri.parse(text)
    assert (uri.bucket, uri.key, uri.prefix) == (bucket, key, prefix)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "is empty"),
        ("bucket/prefix", "has no scheme"),
        ("https://s3.example.com/bucket", "AWS_ENDPOINT_URL"),
        ("s3a://bucket/x", "only 's3://'"),
        ("s3://", "bucket name is empty"),
        ("s3://ab/x", "3 to 63"),
        ("s3://My-Bucket/x", "lowercase"),
        ("s3://bucket_1/x", "only lowercase letters"),
        ("s3://-bucket/x", "start and end"),
        ("s3://a..b/x", "'..'"),
        ("s3://192.168.1.1/x", "IP address"),
        ("s3://bucket/a//b", "empty path segment"),
        ("s3://bucket/a/../b", "'..' segment"),
        ("s3://bucket/a\nb", "control characters"),
    ],
)
def test_parse_errors_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(S3UriError) as err:
        S3Uri.parse(text, field="spec.storage.uri")
    assert "spec.storage.uri" in str(err.value)
    assert fragment in str(err.value)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(S3UriError, match="must be a string"):
        S3Uri.parse(42)


def test_join_and_relative_key() -> None:
    root = S3Uri.parse("s3://bkt/jobs/ns/job/uid")
    assert (
        str(root.join("checkpoints/", "checkpoint-5/"))
        == "s3://bkt/jobs/ns/job/uid/checkpoints/checkpoint-5/"
    )
    assert root.join("a/b", "c.json").key == "jobs/ns/job/uid/a/b/c.json"
    assert S3Uri.parse("s3://bkt").join("x").key == "x"
    assert root.relative_key("jobs/ns/job/uid/a/b") == "a/b"
    with pytest.raises(S3UriError, match="not under"):
        root.relative_key("elsewhere/a")


def test_settings_from_env_defaults_to_path_style_with_custom_endpoint() -> None:
    s = resolve_s3_settings(
        {
            "AWS_ENDPOINT_URL": "http://seaweed:8333",
            "AWS_ACCESS_KEY_ID": "id",
            "AWS_SECRET_ACCESS_KEY": "very-secret",
            "AWS_DEFAULT_REGION": "eu-west-1",
            "AWS_RETRY_MODE": "adaptive",
            "AWS_MAX_ATTEMPTS": "4",
        }
    )
    assert (s.endpoint_url, s.region, s.retry_mode, s.max_attempts, s.addressing_style) == (
        "http://seaweed:8333",
        "eu-west-1",
        "adaptive",
        4,
        "path",
    )
    assert "very-secret" not in repr(s)


def test_settings_precedence_and_aws_defaults() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://a:1",
        "AWS_ENDPOINT_URL_S3": "http://b:2",
        "AWS_REGION": "r1",
        "AWS_DEFAULT_REGION": "r2",
    }
    s = resolve_s3_settings(env, max_attempts=3, addressing_style="virtual")
    assert (s.endpoint_url, s.region, s.max_attempts, s.addressing_style) == (
        "http://b:2",
        "r1",
        3,
        "virtual",
    )
    aws = resolve_s3_settings({})
    assert (aws.endpoint_url, aws.region, aws.retry_mode, aws.addressing_style) == (
        None,
        "us-east-1",
        "standard",
        "auto",
    )


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"AWS_ENDPOINT_URL": "seaweed:8333"}, "AWS_ENDPOINT_URL='seaweed:8333' is not a URL"),
        ({"AWS_ENDPOINT_URL": "http://host:notaport"}, "invalid port"),
        ({"AWS_MAX_ATTEMPTS": "many"}, "AWS_MAX_ATTEMPTS='many' is not an integer"),
        ({"AWS_MAX_ATTEMPTS": "0"}, "AWS_MAX_ATTEMPTS=0 is out of range"),
        ({"AWS_RETRY_MODE": "aggressive"}, "AWS_RETRY_MODE='aggressive' is invalid"),
        ({"KUBETUNE_S3_ADDRESSING_STYLE": "dns"}, "KUBETUNE_S3_ADDRESSING_STYLE='dns' is invalid"),
        ({"AWS_ACCESS_KEY_ID": "id"}, "AWS_SECRET_ACCESS_KEY is not set"),
        ({"AWS_SECRET_ACCESS_KEY": "s"}, "AWS_ACCESS_KEY_ID is not set"),
    ],
)
def test_settings_errors_name_the_variable(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(S3ConfigError, match=fragment.replace("(", r"\(")):
        resolve_s3_settings(env)


@pytest.mark.s3
def test_client_from_env_talks_to_seaweedfs(s3, s3_bucket: str) -> None:
    client = s3_client_from_env(env=s3.env())
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"v")
    assert client.get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"v"
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 8}
    # Credentials are enforced by the test server: wrong ones are refused.
    bad = s3_client_from_env(env={**s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong"})
    with pytest.raises(Exception, match=r"SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        bad.get_object(Bucket=s3_bucket, Key="k")
