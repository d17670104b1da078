"""Downloads: a real HTTP file server on 127.0.0.1 that drops, stalls, lies
and fails on purpose, and `offgrid.py download` run as a subprocess against
it. Every case ends with a verified installed model or a one-line error and
nothing installed."""

import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import offgrid
from conftest import OFFGRID, Server, free_env, run_cli

MODEL_ID = "tiny-q4_k_m"
MODEL_FILE = "tiny.Q4_K_M.gguf"
ENV = {"OFFGRID_DOWNLOAD_TIMEOUT": "1", "OFFGRID_DOWNLOAD_RETRIES": "4"}


TRICKLE, TRICKLE_S = 512, 0.25  # 2 KiB/s: 400 KiB take over three minutes


class FileServer:
    """Serves files from memory over HTTP/1.1 on 127.0.0.1 and misbehaves on
    request. Every request is recorded as (path, Range header, status)."""

    def __init__(self, files):
        self.files = dict(files)   # URL path -> bytes
        self.requests = []
        self.drop_after = []       # per request, in order: close after N body bytes
        self.fail_503 = 0          # answer 503 this many times first
        self.ignore_range = False  # answer 200 with the whole file to a Range request
        self.content_range = None  # a lying Content-Range to send with 206
        self.stall_once = None     # (after N bytes, seconds): go silent once
        self.rate = None           # bytes per second to send at
        # Past this many bytes of a reply, a trickle (TRICKLE bytes every
        # TRICKLE_S) until it is set back to None: a transfer that is still
        # going, however loaded the machine, when a test interrupts it.
        self.slow_after = None
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def ranges(self):
        return [r[1] for r in self.requests]

    def serve(self, h):
        path = urllib.parse.unquote(h.path)
        range_header = h.headers.get("Range")
        with self._lock:
            if path not in self.files:
                status = 404
            elif self.fail_503 > 0:
                self.fail_503 -= 1
                status = 503
            else:
                status = 200
            drop = self.drop_after.pop(0) if status == 200 and self.drop_after else None
            stall, self.stall_once = (self.stall_once, None) if status == 200 else (None, self.stall_once)
        if status != 200:
            self.requests.append((path, range_header, status))
            h.send_response(status)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = self.files[path]
        start = 0
        m = re.match(r"bytes=(\d+)-$", range_header or "")
        if m and not self.ignore_range:
            start = int(m.group(1))
            status = 206
        self.requests.append((path, range_header, status))
        body = data[start:]
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        if status == 206:
            h.send_header("Content-Range", self.content_range or "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
        h.end_headers()
        sent, chunk, started = 0, 16384, time.monotonic()
        try:
            while sent < len(body):
                piece = body[sent:sent + chunk]
                if drop is not None and sent + len(piece) > drop:
                    piece = piece[:drop - sent]
                    h.wfile.write(piece)
                    h.wfile.flush()
                    h.close_connection = True
                    h.connection.shutdown(socket.SHUT_RDWR)
                    return
                if stall and sent >= stall[0]:
                    time.sleep(stall[1])
                    stall = None
                slow_after = self.slow_after
                if slow_after is not None and sent + len(piece) > slow_after:
                    piece = piece[:max(slow_after - sent, TRICKLE)]
                    if sent >= slow_after:
                        time.sleep(TRICKLE_S)
                h.wfile.write(piece)
                sent += len(piece)
                if self.rate:
                    ahead = sent / float(self.rate) - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True


def gguf_with_random_data(make_gguf, name, rows, cols=256):
    """A valid GGUF file whose tensor data is random, so a byte in the wrong
    place changes the sha256 (all-zero data would hide offset bugs)."""
    path = make_gguf(name, tensors=(("w", (cols, rows)),))
    data = bytearray(open(path, "rb").read())
    n = rows * cols * 4
    data[len(data) - n:] = os.urandom(n)
    return bytes(data)


def write_catalog(home, models):
    os.makedirs(str(home), exist_ok=True)
    with open(os.path.join(str(home), "catalog.json"), "w") as f:
        json.dump({"models": models}, f)


def entry_for(data, url, model_id=MODEL_ID, file=MODEL_FILE, **extra):
    entry = {"id": model_id, "file": file, "url": url, "size": len(data),
             "sha256": hashlib.sha256(data).hexdigest(), "min_ram_gb": 0.01}
    entry.update(extra)
    return entry


@pytest.fixture
def model_bytes(make_gguf):
    return gguf_with_random_data(make_gguf, "tiny-src.gguf", rows=600)  # ~600 KiB


@pytest.fixture
def files_server(model_bytes):
    srv = FileServer({"/files/" + MODEL_FILE: model_bytes})
    yield srv
    srv.close()


@pytest.fixture
def home(tmp_path, files_server, model_bytes):
    """An offgrid home whose catalog.json points at the test server."""
    home = tmp_path / "home"
    write_catalog(home, [entry_for(model_bytes, files_server.url + "/files/" + MODEL_FILE)])
    return home


def models_dir(home):
    return os.path.join(str(home), "models")


def download(home, *args, env=None, timeout=120):
    return run_cli(["download"] + list(args), home, env=dict(ENV, **(env or {})), timeout=timeout)


def installed(home):
    r = run_cli(["list", "--json"], home)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_installed_ok(home, data, source):
    models = installed(home)
    assert [m["id"] for m in models] == [MODEL_ID]
    m = models[0]
    assert m["file"] == MODEL_FILE and m["size"] == len(data)
    assert m["sha256"] == hashlib.sha256(data).hexdigest()
    assert m["source"] == source
    path = os.path.join(models_dir(home), MODEL_FILE)
    assert offgrid.sha256_file(path) == m["sha256"]
    assert not os.path.exists(path + ".part")
    return m


def assert_one_line_error(r, *fragments):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("offgrid: error: ")]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def assert_nothing_installed(home):
    assert installed(home) == []
    folder = models_dir(home)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    assert not [n for n in names if n.endswith(".gguf") or n.endswith(offgrid.MANIFEST_SUFFIX)], names


def write_part(home, data):
    os.makedirs(models_dir(home), exist_ok=True)
    path = os.path.join(models_dir(home), MODEL_FILE + ".part")
    with open(path, "wb") as f:
        f.write(data)
    return path


# The plain path ############################################################

def test_download_installs_verified_model_from_catalog_url(home, files_server, model_bytes):
    r = download(home, MODEL_ID)
    assert r.returncode == 0, r.stderr
    url = files_server.url + "/files/" + MODEL_FILE
    assert "installed %s" % MODEL_ID in r.stdout and "verified" in r.stdout
    m = assert_installed_ok(home, model_bytes, url)
    assert m["architecture"] == "llama" and m["quantization"] == "F32"
    assert files_server.ranges() == [None]
    # Non-terminal progress: a line per 10%.
    assert "%s 100%%" % MODEL_ID in r.stderr


def test_already_installed_model_is_not_downloaded_again(home, files_server, model_bytes):
    assert download(home, MODEL_ID).returncode == 0
    r = download(home, MODEL_ID)
    assert r.returncode == 0, r.stderr
    assert "already installed" in r.stdout
    assert len(files_server.requests) == 1


def test_quant_picks_the_family_member(tmp_path, files_server, make_gguf):
    q4 = gguf_with_random_data(make_gguf, "a.gguf", rows=40)
    q8 = gguf_with_random_data(make_gguf, "b.gguf", rows=50)
    files_server.files.update({"/tiny.Q4_K_M.gguf": q4, "/tiny.Q8_0.gguf": q8})
    home = tmp_path / "h"
    write_catalog(home, [
        entry_for(q4, files_server.url + "/tiny.Q4_K_M.gguf", "tiny-q4_k_m", "tiny.Q4_K_M.gguf", family="tiny"),
        entry_for(q8, files_server.url + "/tiny.Q8_0.gguf", "tiny-q8_0", "tiny.Q8_0.gguf", family="tiny"),
    ])
    r = download(home, "tiny", "--quant", "q8_0")
    assert r.returncode == 0, r.stderr
    assert [m["id"] for m in installed(home)] == ["tiny-q8_0"]
    assert_one_line_error(download(home, "tiny", "--quant", "Q2_K"), "no Q2_K", "Q4_K_M, Q8_0")
    assert_one_line_error(download(home, "no-such-model"), "not in the catalog")


# Links that break ##########################################################

def test_download_resumes_after_drop(home, files_server, model_bytes):
    files_server.drop_after = [200000]
    r = download(home, MODEL_ID)
    assert r.returncode == 0, r.stderr
    assert files_server.ranges() == [None, "bytes=200000-"]
    assert "download retry" in r.stderr
    assert_installed_ok(home, model_bytes, files_server.url + "/files/" + MODEL_FILE)


def test_link_that_keeps_dropping_but_makes_progress_is_not_given_up(home, files_server, model_bytes):
    # Four drops with one retry allowed: each retry got further, so it goes on.
    files_server.drop_after = [100000, 100000, 100000, 100000]
    r = download(home, MODEL_ID, env={"OFFGRID_DOWNLOAD_RETRIES": "1"})
    assert r.returncode == 0, r.stderr
    assert files_server.ranges() == [None, "bytes=100000-", "bytes=200000-", "bytes=300000-", "bytes=400000-"]
    assert_installed_ok(home, model_bytes, files_server.url + "/files/" + MODEL_FILE)


def test_progress_rate_counts_only_new_bytes():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    out = Terminal()
    progress = offgrid.Progress("m", stream=out)
    progress(500 * 1024 ** 2, 1000 * 1024 ** 2)  # a resumed .part: 500 MiB already there
    time.sleep(0.5)
    progress(500 * 1024 ** 2 + 1024 ** 2, 1000 * 1024 ** 2)
    rates = re.findall(r"([0-9.]+) (KiB|MiB|GiB)/s", out.getvalue())
    assert rates[-1][1] in ("KiB", "MiB") and float(rates[-1][0]) < (10 if rates[-1][1] == "MiB" else 1e4), rates
    assert "50.1%" in out.getvalue()


def test_existing_part_is_resumed_with_range(home, files_server, model_bytes):
    write_part(home, model_bytes[:123456])
    r = download(home, MODEL_ID)
    assert r.returncode == 0, r.stderr
    assert files_server.ranges() == ["bytes=123456-"]
    assert_installed_ok(home, model_bytes, files_server.url + "/files/" + MODEL_FILE)


def test_complete_but_wrong_part_starts_over(home, files_server, model_bytes):
    write_part(home, os.urandom(len(model_bytes)))
    r = download(home, MODEL_ID)
    assert r.returncode == 0, r.stderr
    assert "starting over" in r.stderr and files_server.ranges() == [None]
    assert_installed_ok(home, model_bytes, files_server.url + "/files/" + MODEL_FILE)


def test_server_ignoring_range_restarts_from_zero(home, files_server, model_bytes):
    # The .part holds junk: appending the 200 body to it would break the sha256.
    write_part(home, os.urandom(100000))
    files_server.ignore_range = True
    r = download(home, MODEL_ID)
    assert r.returncode == 0, r.stderr
    assert files_server.requests[0][1:] == ("bytes=100000-", 200)
    assert "ignored the range request" in r.stderr
    assert_installed_ok(home, model_bytes, files_server.url + "/files/" + MODEL_FILE)


@pytest.mark.parametrize("lie", ["bytes 0-614399/614400", "bytes 100000-614399/999999"])
def test_lying_content_range_is_refused(home, files_server, model_bytes, lie):
    part = write_part(home, model_bytes[:100000])
    files_server.content_range = lie.replace("614399", str(len(model_bytes) - 1)).replace(
        "614400", str(len(model_bytes)))
    r = download(home, MODEL_ID)
    assert_one_line_error(r, "Content-Range", "bytes 100000-")
    assert_nothing_installed(home)
    # What was there is still good and still there to resume from.
    assert open(part, "rb").read() == model_bytes[:100000]


def test_503_is_retried_with_backoff_then_succeeds(home, files_server, model_bytes):
    files_server.fail_503 = 2
    started = time.monotonic()
    r = download(home, MODEL_ID)
    assert r.returncode == 0, r.stderr
    assert [s for _, _, s in files_server.requests] == [503, 503, 200]
    assert time.monotonic() - started >= 0.5 + 1.0  # two backoff waits
    assert_installed_ok(home, model_bytes, files_server.url + "/files/" + MODEL_FILE)


def test_endless_503_gives_up_with_clear_error(home, files_server):
    files_server.fail_503 = 100
    r = download(home, MODEL_ID, env={"OFFGRID_DOWNLOAD_RETRIES": "2"})
    assert_one_line_error(r, "could not download", "gave up after 3 tries", "HTTP 503")
    assert len(files_server.requests) == 3
    assert_nothing_installed(home)
    assert not os.path.exists(os.path.join(models_dir(home), MODEL_FILE + ".part"))


def test_stalled_transfer_times_out_and_resumes(home, files_server, model_bytes):
    files_server.stall_once = (300000, 4.0)  # silent for longer than the 1 s read timeout
    started = time.monotonic()
    r = download(home, MODEL_ID)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 4.0 + 3.0
    assert "stalled" in r.stderr
    assert files_server.ranges()[0] is None and files_server.ranges()[1].startswith("bytes=")
    assert_installed_ok(home, model_bytes, files_server.url + "/files/" + MODEL_FILE)


def test_wrong_bytes_are_deleted_and_nothing_installed(home, files_server, model_bytes):
    bad = bytearray(model_bytes)
    bad[-1000] ^= 0xFF
    files_server.files["/files/" + MODEL_FILE] = bytes(bad)
    r = download(home, MODEL_ID)
    assert_one_line_error(r, "sha256 mismatch", "deleted the bad download")
    assert_nothing_installed(home)
    assert not os.path.exists(os.path.join(models_dir(home), MODEL_FILE + ".part"))


def test_wrong_size_is_refused_before_download(home, files_server, model_bytes):
    files_server.files["/files/" + MODEL_FILE] = model_bytes + b"extra"
    r = download(home, MODEL_ID)
    assert_one_line_error(r, "serves %d bytes" % (len(model_bytes) + 5))
    assert_nothing_installed(home)


# Sources ###################################################################

def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_mirrors_are_tried_first_and_404_or_refused_moves_on(home, files_server, model_bytes):
    files_server.files["/mirror/" + MODEL_FILE] = model_bytes
    dead = "http://127.0.0.1:%d/models" % closed_port()
    # config mirrors come after --mirror flags
    r = download(home, MODEL_ID, "--mirror", dead, "--mirror", files_server.url + "/empty",
                 env={"OFFGRID_MIRRORS": files_server.url + "/mirror/"})
    assert r.returncode == 0, r.stderr
    assert [(p, s) for p, _, s in files_server.requests] == [
        ("/empty/" + MODEL_FILE, 404), ("/mirror/" + MODEL_FILE, 200)]
    assert "cannot connect" in r.stderr
    assert_installed_ok(home, model_bytes, files_server.url + "/mirror/" + MODEL_FILE)


def test_mirror_with_wrong_bytes_falls_back_to_catalog_url(home, files_server, model_bytes):
    files_server.files["/mirror/" + MODEL_FILE] = model_bytes[:-1] + b"\x00"
    r = download(home, MODEL_ID, "--mirror", files_server.url + "/mirror")
    assert r.returncode == 0, r.stderr
    assert "sha256 mismatch" in r.stderr
    assert_installed_ok(home, model_bytes, files_server.url + "/files/" + MODEL_FILE)


def test_all_sources_missing_is_one_error_listing_them(home, files_server):
    files_server.files.clear()
    r = download(home, MODEL_ID, "--mirror", files_server.url + "/m")
    line = assert_one_line_error(r, "could not download", "HTTP 404")
    assert line.count("HTTP 404") == 2
    assert_nothing_installed(home)


def test_unreachable_sources_suggest_a_mirror(tmp_path, model_bytes):
    home = tmp_path / "h"
    write_catalog(home, [entry_for(model_bytes, "http://127.0.0.1:%d/x.gguf" % closed_port())])
    r = download(home, MODEL_ID)
    assert_one_line_error(r, "cannot connect", "--mirror URL")
    assert_nothing_installed(home)


def test_bad_flags_are_one_line_errors(home):
    assert_one_line_error(download(home, MODEL_ID, "--limit-rate", "fast"), "--limit-rate")
    assert_one_line_error(download(home, MODEL_ID, "--mirror", "ftp://x/y"), "--mirror", "http://")
    r = download(home, MODEL_ID, env={"OFFGRID_MIRRORS": "not-a-url"})
    assert_one_line_error(r, "mirrors", "not-a-url")
    assert r.returncode == 2


def test_parse_rate_units():
    assert offgrid.parse_rate("500K") == 500 * 1024
    assert offgrid.parse_rate("2M") == 2 * 1024 ** 2
    assert offgrid.parse_rate("1G") == 1024 ** 3
    assert offgrid.parse_rate("1.5m") == int(1.5 * 1024 ** 2)
    assert offgrid.parse_rate("4096") == 4096
    for bad in ("", "0", "-1M", "2X", "M"):
        with pytest.raises(offgrid.OffgridError):
            offgrid.parse_rate(bad)


def test_file_names_that_escape_the_store_are_refused(tmp_path, files_server, model_bytes):
    home = tmp_path / "h"
    outside = tmp_path / "escaped.gguf"
    for name in ("../escaped.gguf", str(outside), "sub/escaped.gguf", ".hidden.gguf", "..\\escaped.gguf"):
        write_catalog(home, [entry_for(model_bytes, files_server.url + "/files/" + MODEL_FILE, file=name)])
        r = download(home, MODEL_ID)
        assert_one_line_error(r, "not a plain file name")
        assert not outside.exists()
    assert files_server.requests == []
    assert_nothing_installed(home)


# Limits ####################################################################

def test_limit_rate_caps_bandwidth(home, files_server, model_bytes):
    limit = 200 * 1024
    started = time.monotonic()
    r = download(home, MODEL_ID, "--limit-rate", "200K")
    elapsed = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    # Measured at the client: loopback socket buffers swallow the whole file
    # at once, so the server's clock says nothing. Generous bounds: this is
    # a behaviour check, not a performance target (unlimited, the same
    # transfer takes a few milliseconds).
    rate = len(model_bytes) / elapsed
    assert 0.3 * limit < rate < 1.2 * limit, rate
    assert_installed_ok(home, model_bytes, files_server.url + "/files/" + MODEL_FILE)


def test_not_enough_disk_space_is_refused_before_download(tmp_path, files_server, make_gguf):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % (r.stderr.strip() or r.returncode))
    try:
        big = gguf_with_random_data(make_gguf, "big.gguf", rows=2048)  # 2 MiB, on a 1 MiB disk
        files_server.files["/big.gguf"] = big
        home = tmp_path / "h"
        write_catalog(home, [entry_for(big, files_server.url + "/big.gguf", file="big.gguf")])
        r = download(home, MODEL_ID, env={"OFFGRID_MODELS_DIR": str(small)})
        assert_one_line_error(r, "not enough space in %s" % small, "2.0 MiB more")
        assert os.listdir(str(small)) == []
        assert files_server.requests == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


# Large files: many blocks to copy and hash #################################

LARGE_ROWS = 12 * 1024  # 12 MiB of random tensor data: several blocks, writeback steps and hash reads


@pytest.fixture
def large(tmp_path, make_gguf):
    """(home, server, data) for a model of about 12 MiB."""
    data = gguf_with_random_data(make_gguf, "large-src.gguf", rows=LARGE_ROWS)
    srv = FileServer({"/files/" + MODEL_FILE: data})
    home = tmp_path / "large-home"
    write_catalog(home, [entry_for(data, srv.url + "/files/" + MODEL_FILE)])
    yield home, srv, data
    srv.close()


def test_one_byte_changed_in_the_middle_of_a_large_download_is_refused(large):
    home, srv, data = large
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x01
    srv.files["/files/" + MODEL_FILE] = bytes(bad)
    r = download(home, MODEL_ID)
    assert_one_line_error(r, "sha256 mismatch", "deleted the bad download")
    assert_nothing_installed(home)
    assert os.listdir(models_dir(home)) == []


def test_resumed_download_verifies_the_bytes_it_kept_too(large):
    home, srv, data = large
    kept = bytearray(data[:6 * 1024 * 1024])
    kept[3 * 1024 * 1024] ^= 0x01  # went bad on the disk since the last run
    write_part(home, bytes(kept))
    r = download(home, MODEL_ID)
    assert srv.ranges() == ["bytes=%d-" % len(kept)]
    assert_one_line_error(r, "sha256 mismatch", "deleted the bad download")
    assert_nothing_installed(home)
    r = download(home, MODEL_ID)
    assert r.returncode == 0, r.stderr
    assert srv.ranges()[1:] == [None]
    assert_installed_ok(home, data, srv.url + "/files/" + MODEL_FILE)


def test_a_drop_in_the_middle_of_a_large_download_loses_nothing(large):
    home, srv, data = large
    srv.drop_after = [7 * 1024 * 1024 + 1234]
    r = download(home, MODEL_ID)
    assert r.returncode == 0, r.stderr
    # Every byte that arrived was kept: the retry asks for the rest only.
    assert srv.ranges() == [None, "bytes=%d-" % (7 * 1024 * 1024 + 1234)]
    assert_installed_ok(home, data, srv.url + "/files/" + MODEL_FILE)


def test_a_disk_that_refuses_writes_mid_download_keeps_the_part_and_says_so(large):
    # The kernel refuses writes past 5 MiB (RLIMIT_FSIZE), as a full or
    # failing disk would.
    import resource
    home, srv, data = large

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (5 << 20, 5 << 20))
    r = subprocess.run([sys.executable, OFFGRID, "download", MODEL_ID], env=free_env(home, **ENV), cwd=str(home),
                       capture_output=True, text=True, timeout=120, preexec_fn=limited)
    part = os.path.join(models_dir(home), MODEL_FILE + ".part")
    assert_one_line_error(r, "cannot write %s: File too large" % part, "the same command resumes")
    assert os.path.getsize(part) == 5 << 20
    assert_nothing_installed(home)
    r = download(home, MODEL_ID)
    assert r.returncode == 0, r.stderr
    assert srv.ranges() == [None, "bytes=%d-" % (5 << 20)]
    assert_installed_ok(home, data, srv.url + "/files/" + MODEL_FILE)


# Interruptions #############################################################

def wait_for_part(path, at_least, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path) >= at_least:
            return os.path.getsize(path)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the .part never reached %d bytes" % at_least)


@pytest.mark.slow
def test_sigkill_mid_download_leaves_part_and_rerun_resumes(home, files_server, model_bytes):
    files_server.slow_after = 200000  # the download cannot end before the kill
    part = os.path.join(models_dir(home), MODEL_FILE + ".part")
    proc = subprocess.Popen([sys.executable, OFFGRID, "download", MODEL_ID], env=free_env(home, **ENV),
                            cwd=str(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_part(part, 100000, proc)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    kept = os.path.getsize(part)
    assert 0 < kept < len(model_bytes)
    assert installed(home) == []
    files_server.slow_after = None
    r = download(home, MODEL_ID)
    assert r.returncode == 0, r.stderr
    assert files_server.ranges() == [None, "bytes=%d-" % kept]
    assert_installed_ok(home, model_bytes, files_server.url + "/files/" + MODEL_FILE)


def test_ctrl_c_keeps_part_and_says_how_to_continue(home, files_server, model_bytes):
    files_server.slow_after = 200000  # the download cannot end before the signal
    part = os.path.join(models_dir(home), MODEL_FILE + ".part")
    # Ctrl-C as at a terminal: a suite started in the background (`&` in a
    # script) hands its children SIGINT ignored, and Python then keeps it so.
    proc = subprocess.Popen([sys.executable, OFFGRID, "download", MODEL_ID], env=free_env(home, **ENV),
                            cwd=str(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_part(part, 100000, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "offgrid download %s" % MODEL_ID in err and part in err
    assert "Traceback" not in err
    assert 0 < os.path.getsize(part) < len(model_bytes)
    assert installed(home) == []


# Over HTTP #################################################################

@pytest.fixture
def api(home, make_gguf, start_server):
    """A real `offgrid serve` whose home holds the test catalog. A tiny model
    is already installed so serve does not copy in the starter model."""
    os.makedirs(models_dir(home), exist_ok=True)
    shutil.copy(make_gguf("tiny-installed.gguf"), models_dir(home))
    return start_server(home=home, env=ENV, wait_model=False)


def poll(api, job, until, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body, _ = api.get("/v1/models/download/" + job)
        assert status == 200, body
        if until(body):
            return body
        time.sleep(0.05)
    raise AssertionError("job never got there: %r" % body)


def test_http_download_job_runs_to_done(api, files_server, model_bytes):
    status, job, _ = api.post("/v1/models/download", {"id": MODEL_ID})
    assert status == 202, job
    assert job["status"] in ("queued", "running") and job["bytes_total"] == len(model_bytes)
    done = poll(api, job["job"], lambda j: j["status"] in ("done", "failed", "cancelled"))
    assert done["status"] == "done", done
    assert done["bytes_done"] == len(model_bytes) and done["error"] is None
    assert done["source"] == files_server.url + "/files/" + MODEL_FILE
    status, listing, _ = api.get("/v1/models")
    card = [m for m in listing["data"] if m["id"] == MODEL_ID][0]
    assert card["sha256"] == hashlib.sha256(model_bytes).hexdigest()
    # Asking again finds it installed.
    status, again, _ = api.post("/v1/models/download", {"id": MODEL_ID})
    again = poll(api, again["job"], lambda j: j["status"] == "done")
    assert again["already_installed"] is True and len(files_server.requests) == 1


def test_http_download_cancel_keeps_part_and_resumes(api, home, files_server, model_bytes):
    files_server.slow_after = 200000  # the download cannot end before the cancel
    status, job, _ = api.post("/v1/models/download", {"id": MODEL_ID})
    assert status == 202
    poll(api, job["job"], lambda j: j["status"] == "running" and j["bytes_done"] > 50000)
    status, second, _ = api.post("/v1/models/download", {"id": MODEL_ID})
    assert status == 409 and second["error"]["code"] == "download_in_progress"
    status, cancelled, _ = api.request("DELETE", "/v1/models/download/" + job["job"])
    assert status == 200 and cancelled["status"] == "cancelled", cancelled
    assert 0 < cancelled["bytes_done"] < len(model_bytes)
    kept = os.path.getsize(os.path.join(models_dir(home), MODEL_FILE + ".part"))
    assert kept == cancelled["bytes_done"]
    assert MODEL_ID not in [m["id"] for m in api.get("/v1/models")[1]["data"]]
    files_server.slow_after = None
    status, job2, _ = api.post("/v1/models/download", {"id": MODEL_ID})
    done = poll(api, job2["job"], lambda j: j["status"] in ("done", "failed"))
    assert done["status"] == "done", done
    assert files_server.ranges() == [None, "bytes=%d-" % kept]
    assert MODEL_ID in [m["id"] for m in api.get("/v1/models")[1]["data"]]


def test_http_download_errors_have_the_api_shape(api, files_server):
    status, body, _ = api.post("/v1/models/download", {"id": "nope"})
    assert status == 404 and body["error"]["code"] == "model_not_in_catalog" and body["error"]["param"] == "id"
    status, body, _ = api.post("/v1/models/download", {"id": MODEL_ID, "quant": "Q2_K"})
    assert status == 404 and body["error"]["param"] == "quant"
    status, body, _ = api.post("/v1/models/download", {"model": MODEL_ID})
    assert status == 400 and body["error"]["param"] == "model"
    status, body, _ = api.post("/v1/models/download", {})
    assert status == 400 and body["error"]["param"] == "id"
    status, body, _ = api.post("/v1/models/download", {"id": MODEL_ID, "mirror": "file:///etc"})
    assert status == 400 and body["error"]["param"] == "mirror"
    status, body, _ = api.get("/v1/models/download/nope")
    assert status == 404 and body["error"]["code"] == "job_not_found"
    status, body, _ = api.request("DELETE", "/v1/models/download/nope")
    assert status == 404
    # A failing download is a failed job with the reason, not a crashed server.
    files_server.files.clear()
    status, job, _ = api.post("/v1/models/download", {"id": MODEL_ID})
    failed = poll(api, job["job"], lambda j: j["status"] in ("done", "failed"))
    assert failed["status"] == "failed" and "HTTP 404" in failed["error"]
    status, jobs, _ = api.get("/v1/models/download")
    assert status == 200 and [j["job"] for j in jobs["data"]] == [job["job"]]
