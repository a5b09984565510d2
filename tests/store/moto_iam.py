"""``python tests/store/moto_iam.py -H HOST -p PORT``: moto's server, judging S3 requests by IAM's action names.

IAM authorises S3 API operations with its own action names (AWS's "Policy actions for S3 API
operations"): HeadObject needs s3:GetObject, the multipart calls s3:PutObject, ListObjectsV2
s3:ListBucket. moto 5.2.6 checks policies against the operation's own name instead
(``s3:HeadObject``, ``s3:CreateMultipartUpload``: actions IAM does not have), so a policy that is
right for real S3 is refused there; moto 5.2.1 already used IAM's names. This translates the
operation names before moto evaluates the policy, so every moto version judges as S3 does.
"""

from __future__ import annotations

import sys
from typing import Any

#: S3 API operation -> the IAM action that authorises it (only where the two names differ)
IAM_ACTION = {
    "HeadObject": "GetObject",
    "HeadBucket": "ListBucket",
    "ListObjects": "ListBucket",
    "ListObjectsV2": "ListBucket",
    "ListObjectVersions": "ListBucketVersions",
    "CreateMultipartUpload": "PutObject",
    "UploadPart": "PutObject",
    "UploadPartCopy": "PutObject",
    "CompleteMultipartUpload": "PutObject",
    "CopyObject": "PutObject",
    "DeleteObjects": "DeleteObject",
    "ListParts": "ListMultipartUploadParts",
    "ListMultipartUploads": "ListBucketMultipartUploads",
}


def _install() -> None:
    from moto.iam.access_control import S3IAMRequest

    original = S3IAMRequest.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        service, _, operation = self._action.partition(":")
        self._action = f"{service}:{IAM_ACTION.get(operation, operation)}"

    S3IAMRequest.__init__ = init  # type: ignore[method-assign]


if __name__ == "__main__":
    _install()
    from moto.server import main

    main(sys.argv[1:])
