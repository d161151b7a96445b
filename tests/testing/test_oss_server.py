"""The local OSS server against the real, unmodified oss2 and ossfs clients."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from email.utils import formatdate
from pathlib import Path

import oss2
import ossfs
import pytest
import requests

from kubeai_train.testing import _oss_auth
from kubeai_train.testing.oss_server import AdminClient, Fault, OSSServer

pytestmark = pytest.mark.integration

KEY_ID = "test-id"
SECRET = "test-secret-do-not-log"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("oss")
    with OSSServer(root, access_key_id=KEY_ID, access_key_secret=SECRET, buckets=["bkt", "list"]) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean_faults(server):
    server.clear_faults()
    yield
    server.clear_faults()


@pytest.fixture
def bucket(server):
    return oss2.Bucket(oss2.Auth(KEY_ID, SECRET), server.endpoint, "bkt")


@pytest.fixture
def fs(server):
    return ossfs.OSSFileSystem(skip_instance_cache=True, **server.storage_options())


# ------------------------------------------------------------------ objects through ossfs
def test_ossfs_round_trip_listing_info_and_delete(fs, server):
    fs.pipe("bkt/rt/a.txt", b"hello")
    fs.pipe("bkt/rt/sub/b.bin", b"\x00" * 300)
    fs.pipe("bkt/rt/with space & ünïcode+plus.txt", b"u")
    assert fs.cat("bkt/rt/a.txt") == b"hello"
    assert fs.cat("bkt/rt/with space & ünïcode+plus.txt") == b"u"
    assert sorted(fs.ls("bkt/rt", detail=False)) == [
        "bkt/rt/a.txt",
        "bkt/rt/sub/",  # ossfs names prefixes as OSS returns them
        "bkt/rt/with space & ünïcode+plus.txt",
    ]
    info = fs.info("bkt/rt/sub/b.bin")
    assert (info["type"], info["size"]) == ("file", 300)
    assert fs.isdir("bkt/rt/sub") and fs.exists("bkt/rt/a.txt") and not fs.exists("bkt/rt/nope")
    # the file really is a file under ROOT/<bucket>/<key>
    assert Path(server.root, "bkt", "rt", "a.txt").read_bytes() == b"hello"
    fs.mv("bkt/rt/a.txt", "bkt/rt/moved.txt")  # CopyObject + DeleteObject
    assert fs.cat("bkt/rt/moved.txt") == b"hello" and not fs.exists("bkt/rt/a.txt")
    fs.rm("bkt/rt", recursive=True)  # DeleteMultipleObjects
    fs.invalidate_cache()
    assert not fs.exists("bkt/rt")
    assert not os.path.exists(os.path.join(server.root, "bkt", "rt"))  # emptied prefixes disappear


def test_ossfs_large_files_use_multipart_and_append(fs, server):
    data = os.urandom(11 << 20)  # > 2 x ossfs's 5 MiB block: pipe uses multipart upload
    server.reset_stats()
    fs.pipe("bkt/big/multipart.bin", data)
    assert server.stats()["requests"]["UploadPart"] == 3
    assert fs.cat("bkt/big/multipart.bin") == data
    with fs.open("bkt/big/appended.bin", "wb") as f:  # ossfs writes through AppendObject
        f.write(data[: 6 << 20])
    assert fs.cat("bkt/big/appended.bin") == data[: 6 << 20]
    with fs.open("bkt/big/multipart.bin", "rb") as f:
        f.seek(7 << 20)
        assert f.read(1000) == data[7 << 20 : (7 << 20) + 1000]


def test_ossfs_put_and_get_file_verify_crc(fs, tmp_path):
    local = tmp_path / "in.bin"
    local.write_bytes(os.urandom(3 << 20))
    fs.put_file(str(local), "bkt/files/in.bin")
    fs.get_file("bkt/files/in.bin", str(tmp_path / "out.bin"))  # oss2 checks the CRC-64 of the body
    assert (tmp_path / "out.bin").read_bytes() == local.read_bytes()


# ------------------------------------------------------------------ listing
@pytest.fixture(scope="module")
def listed(server):
    """1234 objects under list/big/ (written straight into ROOT: offline mode serves them as they are)."""
    keys = []
    for i in range(1234):
        key = f"big/d{i % 3}/part-{i:05d}.parquet" if i % 2 else f"big/part-{i:05d}.parquet"
        path = os.path.join(server.root, "list", *key.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x" * (i % 7))
        keys.append(key)
    return sorted(keys)


def test_list_v1_pages_through_a_large_prefix(server, listed):
    b = oss2.Bucket(oss2.Auth(KEY_ID, SECRET), server.endpoint, "list")
    server.reset_stats()
    got = [o.key for o in oss2.ObjectIterator(b, prefix="big/", max_keys=100)]
    assert got == listed
    assert server.stats()["requests"]["ListObjects"] == 13  # 1234 keys, 100 a page
    page = b.list_objects(prefix="big/", max_keys=1000)
    assert len(page.object_list) == 1000 and page.is_truncated
    rest = b.list_objects(prefix="big/", marker=page.next_marker, max_keys=1000)
    assert [o.key for o in page.object_list + rest.object_list] == listed and not rest.is_truncated
    sizes = {o.key: o.size for o in page.object_list}
    assert sizes["big/part-00004.parquet"] == 4


def test_list_delimiter_common_prefixes_and_v2_tokens(server, listed):
    b = oss2.Bucket(oss2.Auth(KEY_ID, SECRET), server.endpoint, "list")
    top = [o.key for o in oss2.ObjectIterator(b, prefix="big/", delimiter="/", max_keys=50)]
    flat = [k for k in listed if "/" not in k[len("big/") :]]
    assert top == sorted(flat + ["big/d0/", "big/d1/", "big/d2/"])
    v2 = [o.key for o in oss2.ObjectIteratorV2(b, prefix="big/d1/", max_keys=37)]
    assert v2 == [k for k in listed if k.startswith("big/d1/")]
    partial = b.list_objects_v2(prefix="big/part-0", max_keys=5, start_after="big/part-00100.parquet")
    assert [o.key for o in partial.object_list] == [
        k for k in listed if k.startswith("big/part-0") and k > "big/part-00100.parquet"
    ][:5]


def test_ossfs_find_and_glob_over_a_large_prefix(server, listed):
    fs = ossfs.OSSFileSystem(skip_instance_cache=True, **server.storage_options())
    found = fs.find("list/big")
    assert found == ["list/" + k for k in listed]
    assert len(fs.glob("list/big/d2/*.parquet")) == sum(k.startswith("big/d2/") for k in listed)


# ------------------------------------------------------------------ ranges
def test_get_with_ranges(bucket, server):
    data = bytes(range(256)) * 40
    bucket.put_object("ranges.bin", data)
    std = {"x-oss-range-behavior": "standard"}
    r = bucket.get_object("ranges.bin", byte_range=(10, 19))
    assert r.read() == data[10:20] and r.status == 206 and r.content_range == f"bytes 10-19/{len(data)}"
    assert bucket.get_object("ranges.bin", byte_range=(10000, None)).read() == data[10000:]
    assert bucket.get_object("ranges.bin", byte_range=(None, 7)).read() == data[-7:]
    # past the end: truncated under "standard", the whole object under the legacy behaviour
    assert bucket.get_object("ranges.bin", byte_range=(10230, 20000), headers=std).read() == data[10230:]
    assert bucket.get_object("ranges.bin", byte_range=(10230, 20000)).read() == data
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.get_object("ranges.bin", byte_range=(20000, 20001), headers=std)
    assert e.value.status == 416
    server.reset_stats()
    bucket.get_object("ranges.bin", byte_range=(100, 199)).read()
    stats = server.stats()
    assert stats["bytes_by_object"] == {"bkt/ranges.bin": 100}
    assert stats["get_ranges"] == [("bkt/ranges.bin", 100, 200)]


def test_head_meta_and_missing_objects(bucket):
    bucket.put_object(
        "meta.txt", b"abc", headers={"x-oss-meta-owner": "team-a", "Content-Type": "text/plain"}
    )
    head = bucket.head_object("meta.txt")
    assert head.content_length == 3 and head.content_type == "text/plain"
    assert head.headers["x-oss-meta-owner"] == "team-a"
    assert head.server_crc is not None
    assert bucket.object_exists("meta.txt") and not bucket.object_exists("absent.txt")
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.get_object("absent.txt")
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        oss2.Bucket(bucket.auth, bucket.endpoint, "no-such-bucket").get_object("x")


# ------------------------------------------------------------------ writes
def test_multipart_upload_complete_list_abort(bucket, server):
    up = bucket.init_multipart_upload("mp/obj.bin").upload_id
    p1, p2 = os.urandom(200 * 1024), os.urandom(1000)
    parts = [
        oss2.models.PartInfo(1, bucket.upload_part("mp/obj.bin", up, 1, p1).etag, size=len(p1)),
        oss2.models.PartInfo(2, bucket.upload_part("mp/obj.bin", up, 2, p2).etag, size=len(p2)),
    ]
    assert [p.part_number for p in bucket.list_parts("mp/obj.bin", up).parts] == [1, 2]
    assert not bucket.object_exists("mp/obj.bin")  # nothing visible before Complete
    done = bucket.complete_multipart_upload("mp/obj.bin", up, parts)  # oss2 checks the combined CRC
    assert done.etag.endswith("-2")
    assert bucket.get_object("mp/obj.bin").read() == p1 + p2
    assert bucket.head_object("mp/obj.bin").object_type == "Multipart"
    # parts too small, aborted uploads
    up2 = bucket.init_multipart_upload("mp/small.bin").upload_id
    small = [
        oss2.models.PartInfo(n, bucket.upload_part("mp/small.bin", up2, n, b"x" * 10).etag) for n in (1, 2)
    ]
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.complete_multipart_upload("mp/small.bin", up2, small)
    assert e.value.code == "EntityTooSmall"
    bucket.abort_multipart_upload("mp/small.bin", up2)
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        bucket.list_parts("mp/small.bin", up2)
    assert not os.listdir(os.path.join(server.root, ".oss-uploads"))


def test_resumable_upload_in_parts(bucket, tmp_path):
    local = tmp_path / "r.bin"
    local.write_bytes(os.urandom(700 * 1024))
    oss2.resumable_upload(
        bucket,
        "mp/resumable.bin",
        str(local),
        multipart_threshold=200 * 1024,
        part_size=200 * 1024,
        store=oss2.ResumableStore(root=str(tmp_path)),
    )
    assert bucket.get_object("mp/resumable.bin").read() == local.read_bytes()


def test_append_positions(bucket):
    r = bucket.append_object("app.log", 0, b"one,")
    r = bucket.append_object("app.log", r.next_position, b"two")
    assert bucket.get_object("app.log").read() == b"one,two"
    with pytest.raises(oss2.exceptions.PositionNotEqualToLength) as e:
        bucket.append_object("app.log", 2, b"x")
    assert e.value.headers["x-oss-next-append-position"] == "7"
    bucket.put_object("normal.txt", b"n")
    with pytest.raises(oss2.exceptions.ObjectNotAppendable):
        bucket.append_object("normal.txt", 1, b"x")


def test_forbid_overwrite_and_key_conflicts(bucket):
    bucket.put_object("once.txt", b"1", headers={"x-oss-forbid-overwrite": "true"})
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.put_object("once.txt", b"2", headers={"x-oss-forbid-overwrite": "true"})
    assert (e.value.status, e.value.code) == (409, "FileAlreadyExists")
    assert bucket.get_object("once.txt").read() == b"1"
    bucket.put_object("conflict", b"file")
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.put_object("conflict/child", b"x")
    assert e.value.status == 409 and "prefix" in e.value.message
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.put_object("a/../b", b"x")
    assert e.value.code == "InvalidObjectName"


def test_batch_delete_and_directory_markers(bucket):
    bucket.put_object("dirs/marker/", b"")
    bucket.put_object("dirs/marker/x", b"x")
    keys = [o.key for o in oss2.ObjectIterator(bucket, prefix="dirs/")]
    assert keys == ["dirs/marker/", "dirs/marker/x"]
    result = bucket.batch_delete_objects(["dirs/marker/", "dirs/marker/x", "dirs/never-existed"])
    assert sorted(result.deleted_keys) == ["dirs/marker/", "dirs/marker/x", "dirs/never-existed"]
    assert list(oss2.ObjectIterator(bucket, prefix="dirs/")) == []


# ------------------------------------------------------------------ credentials
def test_bad_credentials_get_real_403s(server, caplog):
    caplog.set_level(logging.DEBUG)
    wrong_secret = oss2.Bucket(oss2.Auth(KEY_ID, "not-the-secret"), server.endpoint, "bkt")
    with pytest.raises(oss2.exceptions.ServerError) as e:
        wrong_secret.get_object("meta.txt")
    assert (e.value.status, e.value.code) == (403, "SignatureDoesNotMatch")
    with pytest.raises(oss2.exceptions.ServerError) as e:
        oss2.Bucket(oss2.Auth("who", SECRET), server.endpoint, "bkt").get_object("meta.txt")
    assert (e.value.status, e.value.code) == (403, "InvalidAccessKeyId")
    with pytest.raises(oss2.exceptions.ServerError) as e:
        oss2.Bucket(oss2.AnonymousAuth(), server.endpoint, "bkt").get_object("meta.txt")
    assert (e.value.status, e.value.code) == (403, "AccessDenied")
    with pytest.raises(oss2.exceptions.ServerError) as e:  # V4 is opt-in in oss2: refused clearly
        oss2.Bucket(oss2.AuthV4(KEY_ID, SECRET), server.endpoint, "bkt", region="cn-hangzhou").get_object(
            "meta.txt"
        )
    assert e.value.status == 403 and "V1" in e.value.message
    with pytest.raises(ValueError, match="bucket name"):
        OSSServer(server.root, buckets=["x"])
    bad_fs = ossfs.OSSFileSystem(
        endpoint=server.endpoint, key=KEY_ID, secret="wrong", skip_instance_cache=True
    )
    with pytest.raises(OSError, match="SignatureDoesNotMatch"):
        bad_fs.cat("bkt/meta.txt")
    assert SECRET not in caplog.text and SECRET not in str(e.value)


def test_signed_urls_and_clock_skew(bucket, monkeypatch):
    bucket.put_object("signed.txt", b"signed")
    url = bucket.sign_url("GET", "signed.txt", 60)
    assert requests.get(url, timeout=10).content == b"signed"
    assert requests.get(url.replace("Signature=", "Signature=x"), timeout=10).status_code == 403
    monkeypatch.setattr(oss2.utils, "http_date", lambda: formatdate(time.time() - 3600, usegmt=True))
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.get_object("signed.txt")
    assert e.value.code == "RequestTimeTooSkewed"


def test_security_token_required_when_configured(tmp_path):
    with OSSServer(
        tmp_path,
        access_key_id="sts-id",
        access_key_secret="sts-secret",
        security_token="tok",
        buckets=["b01"],
    ) as srv:
        good = oss2.Bucket(oss2.StsAuth("sts-id", "sts-secret", "tok"), srv.endpoint, "b01")
        good.put_object("k", b"v")
        assert ossfs.OSSFileSystem(skip_instance_cache=True, **srv.storage_options()).cat("b01/k") == b"v"
        with pytest.raises(oss2.exceptions.ServerError) as e:
            oss2.Bucket(oss2.StsAuth("sts-id", "sts-secret", "other"), srv.endpoint, "b01").get_object("k")
        assert (e.value.status, e.value.code) == (403, "InvalidSecurityToken")
    # stopped means stopped, also for the client's kept-alive connections
    with pytest.raises(oss2.exceptions.RequestError):
        good.get_object("k")


def test_string_to_sign_matches_oss2():
    """Our V1 string-to-sign verifies what oss2 signs, for subresources, odd keys and x-oss headers."""
    auth = oss2.Auth("id", "secret")
    for key, params in [
        ("a/b c+d/ü.txt", {"uploadId": "U1", "partNumber": "3"}),
        ("k", {"append": "", "position": "0"}),
        ("", {"prefix": "p/", "max-keys": "10", "encoding-type": "url"}),
    ]:
        req = oss2.http.Request(
            "PUT",
            "http://127.0.0.1/b/x",
            params=params,
            headers={"x-oss-meta-Z": "1", "Content-Type": "text/plain"},
        )
        auth._sign_request(req, "b", key)
        headers = {k.lower(): v for k, v in req.headers.items() if v is not None}
        _oss_auth.verify(_oss_auth.Credentials("id", "secret"), "PUT", headers, "b", key, dict(params))
        with pytest.raises(_oss_auth.StoreError):
            _oss_auth.verify(_oss_auth.Credentials("id", "other"), "PUT", headers, "b", key, dict(params))
    assert "secret" not in repr(_oss_auth.Credentials("id", "secret").access_key_id)
    assert "sekrit" not in repr(_oss_auth.Credentials("id", "sekrit"))


# ------------------------------------------------------------------ faults
def test_injected_503_and_client_retries(bucket, server):
    bucket.put_object("f/x.txt", b"data")
    fault = server.inject(Fault(kind="error", op="GetObject", key="bkt/f/*", times=1))
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.get_object("f/x.txt")
    assert (e.value.status, e.value.code) == (503, "ServiceUnavailable") and fault.fired == 1
    assert bucket.get_object("f/x.txt").read() == b"data"  # only once
    server.inject(kind="error", op="ListObjects", times=2)  # oss2's iterator retries 5xx itself
    assert [o.key for o in oss2.ObjectIterator(bucket, prefix="f/")] == ["f/x.txt"]


def test_reset_and_truncation_mid_body_surface_in_the_stock_client(bucket, server):
    data = os.urandom(2 << 20)
    bucket.put_object("f/big.bin", data)
    server.reset_stats()
    server.inject(kind="reset", op="GetObject", key="bkt/f/big.bin", after_bytes=1 << 20)
    with pytest.raises((requests.exceptions.RequestException, ConnectionError)):
        bucket.get_object("f/big.bin").read()
    assert 0 < server.stats()["bytes_by_object"]["bkt/f/big.bin"] <= 1 << 20
    server.inject(kind="truncate", op="GetObject", key="bkt/f/big.bin", after_bytes=1000)
    with pytest.raises(requests.exceptions.RequestException):
        bucket.get_object("f/big.bin").read()
    server.inject(kind="reset", op="HeadObject")  # before any response
    with pytest.raises(oss2.exceptions.RequestError):
        bucket.head_object("f/big.bin")
    assert bucket.get_object("f/big.bin").read() == data


def test_slow_responses(bucket, server):
    bucket.put_object("f/slow.bin", b"s" * 100_000)
    server.inject(kind="delay", op="GetObject", seconds=0.3)
    t0 = time.monotonic()
    bucket.get_object("f/slow.bin").read()
    assert time.monotonic() - t0 >= 0.3
    server.inject(kind="throttle", op="GetObject", rate=400_000)
    t0 = time.monotonic()
    assert bucket.get_object("f/slow.bin").read() == b"s" * 100_000
    assert time.monotonic() - t0 >= 0.2


def test_admin_endpoint(bucket, server):
    admin = AdminClient(server.endpoint)
    admin.reset_stats()
    bucket.put_object("f/admin.txt", b"12345")
    bucket.get_object("f/admin.txt").read()
    stats = admin.stats()
    assert stats["bytes_by_object"] == {"bkt/f/admin.txt": 5} and stats["requests"]["PutObject"] == 1
    rule = admin.inject(kind="error", op="GetObject", status=500, code="InternalError")
    assert rule["kind"] == "error"
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.get_object("f/admin.txt")
    assert e.value.status == 500
    with pytest.raises(requests.HTTPError):
        r = requests.post(server.endpoint + "/_admin/faults", json={"kind": "explode"}, timeout=10)
        r.raise_for_status()
    admin.clear_faults()
    assert server.faults.snapshot() == []
    with pytest.raises(ValueError, match="fault kind"):
        Fault(kind="explode")


# ------------------------------------------------------------------ offline mode
def test_cli_prints_endpoint_and_serves(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OSS_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubeai_train.testing.oss_server",
            "--root",
            str(tmp_path),
            "--bucket",
            "data",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines = {}
        deadline = time.monotonic() + 30
        while len(lines) < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("export "):
                k, _, v = line[len("export ") :].split("  #")[0].strip().partition("=")
                lines[k] = v
        assert set(lines) == {"OSS_ENDPOINT", "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET"}
        fs = ossfs.OSSFileSystem(
            endpoint=lines["OSS_ENDPOINT"],
            key=lines["OSS_ACCESS_KEY_ID"],
            secret=lines["OSS_ACCESS_KEY_SECRET"],
            skip_instance_cache=True,
        )
        fs.pipe("data/hello.txt", b"offline")
        assert (tmp_path / "data" / "hello.txt").read_bytes() == b"offline"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    bad = subprocess.run(
        [sys.executable, "-m", "kubeai_train.testing.oss_server", "--root", str(tmp_path), "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "--port" in bad.stderr
