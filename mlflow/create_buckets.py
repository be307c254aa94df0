"""Create S3 buckets if they do not exist yet: the mlflow/ stack's one-shot start-up step.

Runs in the compose service ``create-buckets`` (the MLflow server image, which has boto3) and
without Docker against any S3 endpoint::

    MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=… AWS_SECRET_ACCESS_KEY=… \\
        python mlflow/create_buckets.py mlflow dvc

Idempotent: an existing bucket owned by these credentials is left as it is. Waits up to
``--wait`` seconds for the endpoint to answer, so it can start beside the store.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError


def client(endpoint: str | None):
    """An S3 client for ``endpoint`` (path-style addressing: bucket names are not DNS names here)."""
    return boto3.client("s3", endpoint_url=endpoint or None,
                        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}))


def ensure_bucket(s3, name: str) -> bool:
    """Create bucket ``name`` unless it exists; True when it was created."""
    try:
        s3.head_bucket(Bucket=name)
        return False
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    region = s3.meta.region_name
    # S3 refuses a LocationConstraint of us-east-1 and wants one everywhere else
    where = {} if region in (None, "us-east-1") else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    try:
        s3.create_bucket(Bucket=name, **where)
    except ClientError as exc:  # created meanwhile by another starter
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("buckets", nargs="+", help="bucket names")
    parser.add_argument("--endpoint", default=os.environ.get("MLFLOW_S3_ENDPOINT_URL"),
                        help="S3 endpoint URL (default: $MLFLOW_S3_ENDPOINT_URL; AWS when unset)")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the endpoint")
    args = parser.parse_args(argv)
    s3 = client(args.endpoint)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            s3.list_buckets()
            break
        except (EndpointConnectionError, ConnectionError) as exc:
            if time.monotonic() > deadline:
                print(f"create_buckets: {args.endpoint} did not answer in {args.wait:.0f} s: {exc}", file=sys.stderr)
                return 1
            time.sleep(1.0)
    for name in args.buckets:
        created = ensure_bucket(s3, name)
        print(f"bucket {name}: {'created' if created else 'exists'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
