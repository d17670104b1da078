"""The dashboard at / and /ui, driven in a real headless Chromium (Debian's
/usr/bin/chromium through Playwright) against real offgrid servers: chat
with the starter model, a download from a local, rate-limited file server,
the API key prompt, errors and hostile text. Every request the page makes
must go to its own server, and the browser must log no errors.

Screenshots (390 and 1280 px wide, light and dark) go to $OFFGRID_ARTIFACTS
or tests/artifacts/; tab-*.png are every tab at both widths."""

import base64
import hashlib
import json
import os
import re
import shutil
import sys
import time
import urllib.request

import pytest

import offgrid
from conftest import IN_CI, ROOT, need, wait_for
from test_p2p import lan  # noqa: F401  (the fixture)
from test_download import FileServer, entry_for, gguf_with_random_data, write_catalog

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = os.environ.get("OFFGRID_ARTIFACTS") or os.path.join(ROOT, "tests", "artifacts")
WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser():
    need("playwright", "driving the dashboard in a browser")
    if not os.path.exists(CHROMIUM):
        message = "%s is missing (apt-get install chromium)" % CHROMIUM
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        # No sandbox: CI runs as root, where Chromium refuses to start with one.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Tab:
    """One browser page on one server, recording every request it makes and
    everything it logs."""

    def __init__(self, browser, server, viewport=WIDE, path="/ui"):
        self.origin = server.url
        self.context = browser.new_context(viewport=viewport)
        self.page = self.context.new_page()
        self.requests, self.console, self.errors = [], [], []
        self.page.on("request", lambda r: self.requests.append(r))
        self.page.on("console", lambda m: self.console.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(self.origin + path)

    def chat_requests(self):
        return [json.loads(r.post_data) for r in self.requests if r.url.endswith("/v1/chat/completions")]

    def check_clean(self, expected_statuses=()):
        """Same-origin requests only; no page errors; no console errors but
        the browser's own note on the refusals the test caused on purpose."""
        assert self.requests
        for r in self.requests:
            assert r.url.startswith(self.origin + "/"), "request to another origin: " + r.url
        assert self.errors == [], self.errors
        for kind, text in self.console:
            if kind != "error":
                continue
            m = re.match(r"Failed to load resource: the server responded with a status of (\d+)", text)
            assert m and int(m.group(1)) in expected_statuses, "console error: " + text

    def shot(self, name, dark=False):
        os.makedirs(ARTIFACTS, exist_ok=True)
        self.page.emulate_media(color_scheme="dark" if dark else "light")
        path = os.path.join(ARTIFACTS, "%s-%d%s.png" % (name, self.page.viewport_size["width"],
                                                          "-dark" if dark else ""))
        self.page.screenshot(path=path, full_page=True)
        return path

    def text(self, selector):
        return self.page.inner_text(selector)

    def close(self):
        self.context.close()


@pytest.fixture
def tabs(browser):
    opened = []

    def open_tab(server, **kw):
        tab = Tab(browser, server, **kw)
        opened.append(tab)
        return tab
    yield open_tab
    for tab in opened:
        tab.close()


def tiny_store(tmp_path, make_gguf, name="tiny.gguf"):
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    shutil.copy(make_gguf(name), str(models / name))
    return str(models)


# The page itself #############################################################

def test_page_is_one_self_contained_file_with_strict_headers(start_server, tmp_path, make_gguf):
    srv = start_server(models_dir=tiny_store(tmp_path, make_gguf), env={"OFFGRID_API_KEY": "og-secret-page"},
                       wait_model=False)
    for path in ("/", "/ui"):
        # Public: the page holds no secret; the API behind it still needs the key.
        with urllib.request.urlopen(srv.url + path, timeout=30) as r:
            body = r.read().decode("utf-8")
            headers = r.headers
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert headers["Cache-Control"] == "no-cache" and headers["X-Content-Type-Options"] == "nosniff"
        policy = headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
        # The inline style and script are allowed by their hashes, and are the only ones.
        for tag in ("style", "script"):
            blocks = re.findall(r"<%s>(.*?)</%s>" % (tag, tag), body, re.S)
            assert len(blocks) == 1 and body.count("<%s" % tag) == 1, tag
            digest = base64.b64encode(hashlib.sha256(blocks[0].encode("utf-8")).digest()).decode()
            assert "%s-src 'sha256-%s'" % (tag, digest) in policy, tag
        assert not re.search(r"https?://", body), "the page names an outside address"
        assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[a-z]+:""", body)
        assert not re.search(r"\son[a-z]+\s*=", body), "inline event handlers would be blocked by the CSP"
    assert srv.get("/v1/models")[0] == 401


# Chat ########################################################################

def stored_conversations(page):
    """The conversations the page keeps in localStorage, most recent first."""
    return page.evaluate("() => JSON.parse(localStorage.getItem('offgrid.conversations')).conversations")


def open_chat(tabs, server):
    """A tab on the chat, the starter model picked, the settings open."""
    tab = tabs(server)
    wait_for("the model picker", lambda: tab.page.input_value("#chat-model") == offgrid.GEMMA["id"])
    tab.page.click("#settings summary")
    return tab

@pytest.mark.slow
@pytest.mark.model
def test_chat_streams_stops_and_keeps_the_conversation(server, tabs):
    tab = open_chat(tabs, server)
    page = tab.page
    page.fill("#max-tokens", "24")
    page.fill("#prompt", "The capital of France is")
    page.click("#send")
    # Streamed: the reply grows while the Stop button is live.
    lengths = set()

    def growing():
        if not page.is_disabled("#stop"):
            lengths.add(len(tab.text(".msg.assistant .body")))
        return page.is_disabled("#stop") and len(lengths) > 0
    wait_for("the first reply", growing, timeout=300, every=0.01)
    first = tab.text(".msg.assistant .body")
    assert first.strip() and len(lengths) >= 2, lengths
    assert page.is_enabled("#send")

    # A long reply, stopped part way: the text stops growing and says so.
    page.fill("#max-tokens", "2000")
    page.fill("#prompt", "Write a long story about a lighthouse keeper.")
    page.click("#send")
    second = page.locator(".msg.assistant .body").nth(1)
    wait_for("the second reply to start", lambda: len(second.inner_text()) > 10, timeout=300)
    page.click("#stop")
    note = page.locator(".msg.assistant").nth(1).locator(".note")
    wait_for("the stop note", lambda: note.count() == 1 and note.inner_text() == "(stopped)")
    stopped_at = second.inner_text()
    time.sleep(1.0)
    assert second.inner_text() == stopped_at
    assert page.is_disabled("#stop") and page.is_enabled("#send")
    wait_for("the server to count the cancel",
             lambda: server.get("/stats")[1]["models"][offgrid.GEMMA["id"]]["cancelled"] >= 1, timeout=30)

    # The conversation is kept: the third request carries both earlier turns.
    page.fill("#system-prompt", "You answer briefly.")
    page.fill("#max-tokens", "8")
    page.fill("#prompt", "Thank you.")
    page.keyboard.press("Enter")
    wait_for("the third reply", lambda: page.locator(".msg.assistant").count() == 3 and page.is_disabled("#stop")
             and page.is_enabled("#send"), timeout=300)
    third = tab.chat_requests()[2]
    assert third["stream"] is True and third["model"] == offgrid.GEMMA["id"] and third["max_tokens"] == 8
    roles = [m["role"] for m in third["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"], roles
    def words(text):
        return " ".join(text.split())
    # The page shows the replies as Markdown and sends them back as written.
    saved = stored_conversations(page)[0]["messages"]
    assert third["messages"][2]["content"] == saved[1]["content"] and words(saved[1]["content"])
    assert third["messages"][4]["content"] == saved[3]["content"]
    assert words(stopped_at) and words(first)
    tab.shot("chat")
    tab.shot("chat", dark=True)
    page.set_viewport_size(NARROW)
    tab.shot("chat")
    tab.shot("chat", dark=True)
    page.set_viewport_size(WIDE)

    # The System tab shows this server's figures and the stats of these requests.
    page.emulate_media(color_scheme="light")
    page.click("#tab-system")
    wait_for("the per-model stats", lambda: offgrid.GEMMA["id"] in tab.text("#stats"))
    assert tab.text("#fig-model").endswith(offgrid.GEMMA["id"])
    assert re.search(r"\d+ %", tab.text("#fig-cpu")) and "GiB" in tab.text("#fig-ram")
    row = page.locator("#stats tbody tr").first.inner_text().split()
    assert row[0] == offgrid.GEMMA["id"] and int(row[1]) >= 2, row  # the stopped one counts as cancelled
    # The devices llama.cpp sees (the CPU here) and the model's layers on each.
    device = " ".join(page.locator("#devices tbody tr").first.inner_text().split())
    assert device.startswith("CPU (") and "cpu" in device and "GiB" in device, device
    assert "%s: 19 layers" % offgrid.GEMMA["id"] in device, device
    wait_for("a drawn chart", lambda: page.evaluate(
        "() => { const c = document.querySelector('#chart');"
        " return c.width > 0 && c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(x => x); }"))
    tab.shot("system")
    page.set_viewport_size(NARROW)
    tab.shot("system", dark=True)

    # New chat starts over (at phone width from the drawer, which then closes).
    page.click("#tab-chat")
    show_list(page)
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and not page.is_visible("#conv-list")
    show_list(page)
    assert page.locator("#conv-list li[data-conv]").count() == 1
    tab.check_clean()


@pytest.mark.slow
@pytest.mark.model
def test_model_output_and_error_text_are_shown_as_text(server, tabs):
    tab = open_chat(tabs, server)
    page = tab.page
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    hostile = "\n".join(['<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'] * 3)
    page.fill("#prompt", hostile + "\n```html\n<b>bold</b>\n```")
    page.click("#send")
    wait_for("the reply", lambda: page.locator(".msg.assistant .body").inner_text() and page.is_enabled("#send"),
             timeout=300)
    # At temperature 0 the base model echoes the markup it was given.
    reply = tab.text(".msg.assistant .body")
    assert "<img" in reply or "<script>" in reply, reply
    # The user's code fence became a <pre> holding the markup as text.
    assert page.locator(".msg.user pre code").inner_text() == "<b>bold</b>"
    assert page.locator("#messages img, #messages script, #messages b").count() == 0
    assert page.evaluate("() => window.pwned") is None

    # An error message that carries markup (the path comes back in it) is text too.
    page.click("#tab-models")
    page.fill("#stick-path", '/<img src=x onerror="window.pwned=3">')
    page.click("#import")
    wait_for("the error banner", lambda: page.is_visible("#banner"))
    assert 'path: /<img src=x onerror="window.pwned=3"> does not exist' in tab.text("#banner-text")
    assert page.locator("#banner img").count() == 0 and page.evaluate("() => window.pwned") is None
    tab.shot("error")
    tab.check_clean(expected_statuses=(400,))


# Models ######################################################################

@pytest.mark.slow
def test_download_shows_progress_cancels_resumes_and_removes(start_server, tabs, tmp_path, make_gguf):
    data = gguf_with_random_data(make_gguf, "tiny-src.gguf", rows=600)  # ~600 KiB
    files = FileServer({"/files/tiny.Q4_K_M.gguf": data})
    files.rate = 120 * 1024  # about 5 s for the whole file: the bar is seen moving
    files.slow_after = len(data) // 2  # and it is not done before the cancel, however loaded the machine
    try:
        home = tmp_path / "home"
        write_catalog(home, [entry_for(data, files.url + "/files/tiny.Q4_K_M.gguf")])
        srv = start_server(home=home, models_dir=tiny_store(tmp_path, make_gguf, "other.gguf"), wait_model=False)
        tab = tabs(srv)
        page = tab.page
        page.click("#tab-models")
        row = page.locator('#catalog tr[data-catalog="tiny-q4_k_m"]')
        wait_for("the catalog", lambda: row.count() == 1)
        assert "fits" in row.inner_text()
        row.locator("button", has_text="Download").click()
        bar = page.locator(".job .bar").first
        seen = []

        def progress():
            seen.append(int(bar.get_attribute("aria-valuenow") or 0))
            return seen[-1] >= 25
        wait_for("a quarter of the download", progress, timeout=60)
        page.locator(".job button", has_text="Cancel").click()
        job = page.locator(".job").first
        wait_for("the cancel", lambda: "cancelled" in job.inner_text())
        kept = int(bar.get_attribute("aria-valuenow"))
        assert 0 < kept < 100, kept
        tab.shot("download-cancelled")

        files.slow_after = None
        page.locator(".job button", has_text="Resume").click()
        wait_for("the resumed job", lambda: page.locator(".job").count() == 2)
        resumed = page.locator(".job").first  # the new job goes on top
        assert "Download tiny-q4_k_m" in resumed.inner_text()
        values = []

        def finished():
            # Text first: a "done" read here means the bar read next is from
            # that render or a later one, never from the one before it.
            done = "done" in resumed.inner_text()
            values.append(int(resumed.locator(".bar").get_attribute("aria-valuenow") or 0))
            return done
        wait_for("the download to finish", finished, timeout=60)
        assert values[-1] == 100 and resumed.inner_text().count("100%") == 1, values
        assert len(set(v for v in values if 0 < v < 100)) >= 2, "the bar did not move: %r" % values
        assert min(v for v in values if v > 0) >= kept - 1  # resumed, not started over
        # The file server saw a Range request for the rest.
        assert any(r[1] and r[1].startswith("bytes=") for r in files.requests), files.requests
        installed = page.locator('#installed tr[data-model="tiny-q4_k_m"]')
        wait_for("the installed row", lambda: installed.count() == 1)
        assert "installed" in row.inner_text()
        tab.shot("models")
        tab.shot("models", dark=True)
        page.set_viewport_size(NARROW)
        tab.shot("models")
        tab.shot("models", dark=True)
        page.set_viewport_size(WIDE)
        page.emulate_media(color_scheme="light")

        # Remove asks first; "Keep" keeps it, "Yes, remove" removes it.
        installed.locator("button", has_text="Remove").click()
        assert "Remove tiny-q4_k_m?" in installed.inner_text()
        installed.locator("button", has_text="Keep").click()
        wait_for("the row back", lambda: "Verify" in installed.inner_text())
        assert any(m["id"] == "tiny-q4_k_m" for m in srv.get("/v1/models")[1]["data"])
        installed.locator("button", has_text="Remove").click()
        installed.locator("button", has_text="Yes, remove").click()
        wait_for("the row gone", lambda: installed.count() == 0)
        assert not any(m["id"] == "tiny-q4_k_m" for m in srv.get("/v1/models")[1]["data"])
        tab.check_clean()
    finally:
        files.close()


@pytest.mark.slow
def test_verify_export_and_import_from_the_page(start_server, tabs, tmp_path, make_gguf):
    stick = tmp_path / "stick"
    stick.mkdir()
    srv = start_server(models_dir=tiny_store(tmp_path, make_gguf), wait_model=False)
    tab = tabs(srv)
    page = tab.page
    page.click("#tab-models")
    row = page.locator('#installed tr[data-model="tiny"]')
    wait_for("the installed row", lambda: row.count() == 1)
    row.locator("button", has_text="Verify").click()
    job = page.locator('.job[data-job^="verify-"]')
    wait_for("the check", lambda: "done" in job.inner_text())
    assert "tiny: sha256 recorded" in job.inner_text()
    page.fill("#stick-path", str(stick))
    row.locator("input.pick").check()
    page.click("#export")
    job = page.locator('.job[data-job^="export-"]')
    wait_for("the export", lambda: "done" in job.inner_text())
    assert "tiny: copied" in job.inner_text() and "100%" in job.inner_text()
    assert os.path.isfile(str(stick / "offgrid" / "tiny.gguf"))
    # Importing the stick back: the same model is already here.
    page.click("#import")
    job = page.locator('.job[data-job^="import-"]')
    wait_for("the import", lambda: "done" in job.inner_text())
    assert "tiny.gguf: skipped (already installed as tiny)" in job.inner_text()
    tab.check_clean()


def test_export_with_a_runtime_from_the_page(start_server, tabs, tmp_path, make_gguf):
    """"with runtime for": a target not gathered here is named in the banner
    with what is held; a held one goes on the stick with its sha256."""
    from conftest import run_cli
    wheel = offgrid.cached_llama_wheel("x86_64")
    if offgrid.machine_arch() != "x86_64" or not wheel:
        if IN_CI:
            pytest.fail("no x86_64 llama-cpp-python wheel in the build cache (build/wheels.sh x86_64)")
        pytest.skip("needs x86_64 and build/wheels.sh x86_64's wheel in the build cache")
    home = tmp_path / "home"
    os.makedirs(str(home))
    python = "%d.%d" % sys.version_info[:2]
    p = run_cli(["runtime", "add", "x86_64-py" + python, "--wheel", wheel], home,
                env={"OFFGRID_BUILD_CACHE": str(tmp_path / "no-cache")})
    assert p.returncode == 0, p.stderr
    stick = tmp_path / "stick"
    stick.mkdir()
    srv = start_server(home=home, models_dir=tiny_store(tmp_path, make_gguf), wait_model=False)
    tab = tabs(srv)
    page = tab.page
    page.click("#tab-models")
    wait_for("the installed row", lambda: page.locator('#installed tr[data-model="tiny"]').count() == 1)
    page.fill("#stick-path", str(stick))
    # The choice lists what this server holds.
    options = page.locator("#export-runtime option")
    wait_for("the held runtimes", lambda: options.count() == 2)
    assert options.all_inner_texts() == ["no runtime", "x86_64 (Python %s)" % python]
    # A target not held (as a script could ask) is refused, naming what is.
    page.evaluate("() => { const o = document.createElement('option'); o.value = 'aarch64';"
                  " document.querySelector('#export-runtime').append(o); }")
    page.select_option("#export-runtime", "aarch64")
    page.click("#export")
    wait_for("the error banner", lambda: page.is_visible("#banner"))
    assert tab.text("#banner-text") == (
        "Export: runtime: no runtime for aarch64 is held here: gather it with `offgrid runtime add aarch64` "
        "(held: x86_64 (Python %s))" % python)
    assert not os.path.exists(str(stick / "offgrid"))
    page.click("#banner-close")
    page.select_option("#export-runtime", "x86_64")
    page.click("#export")
    job = page.locator('.job[data-job^="export-"]')
    wait_for("the export", lambda: "done" in job.inner_text(), timeout=300)
    manifest = json.load(open(str(stick / "offgrid" / "manifest.json")))
    [runtime] = manifest["runtimes"]
    assert runtime["target"] == "x86_64" and len(runtime["files"]) == 7
    assert [m["id"] for m in manifest["models"]] == ["tiny"]
    for f in runtime["files"]:
        assert offgrid.sha256_file(str(stick / "offgrid" / f["name"])) == f["sha256"]
    tab.check_clean(expected_statuses=(400,))


@pytest.mark.model
def test_quantize_from_the_page(start_server, tabs, tmp_path, golden_wide):
    from conftest import link_or_copy
    models = tmp_path / "models"
    models.mkdir()
    link_or_copy(golden_wide["f16"], models / "golden.gguf")
    srv = start_server(models_dir=str(models), wait_model=False)
    tab = tabs(srv)
    page = tab.page
    page.click("#tab-models")
    row = page.locator('#installed tr[data-model="golden"]')
    wait_for("the installed row", lambda: row.count() == 1)
    row.locator("button", has_text="Quantize").click()
    picker = row.locator("select")
    wait_for("the type picker", lambda: picker.count() == 1)
    labels = picker.locator("option").all_inner_texts()
    assert len(labels) == len(offgrid.QUANT_TYPES)
    q8 = next(label for label in labels if label.startswith("Q8_0"))
    assert "MiB" in q8 and "RAM" in q8, labels
    picker.select_option("Q8_0")
    row.locator("button", has_text="Start").click()
    job = page.locator('.job[data-job^="quantize-"]')
    wait_for("the quantization", lambda: "done" in job.inner_text(), timeout=600)
    text = job.inner_text()
    assert "Quantize golden into golden-q8_0" in text and "golden-q8_0: Q8_0" in text and "100%" in text, text
    assert "generated 8 tokens" in text
    wait_for("the new model's row", lambda: page.locator('#installed tr[data-model="golden-q8_0"]').count() == 1)
    tab.shot("quantize")
    tab.check_clean()


# Keys and errors #############################################################

def test_api_key_is_asked_once_and_kept_for_the_session(start_server, tabs, tmp_path, make_gguf):
    srv = start_server(models_dir=tiny_store(tmp_path, make_gguf), env={"OFFGRID_API_KEY": "og-right-key"},
                       wait_model=False)
    tab = tabs(srv)
    page = tab.page
    wait_for("the key prompt", lambda: page.is_visible("#keybox"))
    tab.shot("key")
    page.fill("#key-input", "og-wrong-key")
    page.click("#key-form button")
    wait_for("the refusal", lambda: "That key was refused: the API key is not valid" in tab.text("#key-why")
             and page.is_visible("#keybox"))
    page.fill("#key-input", "og-right-key")
    page.click("#key-form button")
    wait_for("the models", lambda: page.input_value("#chat-model") == "tiny")
    assert not page.is_visible("#keybox")
    assert page.evaluate("() => sessionStorage.getItem('offgrid.key')") == "og-right-key"
    # Every API request after that carried the key.
    keyed = [r for r in tab.requests if "/v1/" in r.url or r.url.endswith("/stats")]
    assert keyed and keyed[-1].headers.get("authorization") == "Bearer og-right-key"
    # A reload in the same tab does not ask again.
    page.reload()
    wait_for("the models after reload", lambda: page.input_value("#chat-model") == "tiny")
    page.click("#tab-models")
    wait_for("the installed table", lambda: page.locator('#installed tr[data-model="tiny"]').count() == 1)
    assert not page.is_visible("#keybox")
    tab.check_clean(expected_statuses=(401,))


def test_api_errors_show_as_readable_messages(start_server, tabs, tmp_path, make_gguf):
    srv = start_server(models_dir=tiny_store(tmp_path, make_gguf), wait_model=False)
    tab = tabs(srv)
    page = tab.page
    page.click("#tab-models")
    page.fill("#stick-path", "/no/such/stick")
    page.click("#export")
    wait_for("the error banner", lambda: page.is_visible("#banner"))
    assert tab.text("#banner-text") == ("Export: path: /no/such/stick does not exist on this server "
                                        "(is the stick mounted?)")
    page.click("#banner-close")
    assert not page.is_visible("#banner")
    # The page is still whole and working.
    assert page.locator('#installed tr[data-model="tiny"]').count() == 1
    page.set_viewport_size(NARROW)
    page.fill("#stick-path", "relative/path")
    page.click("#import")
    wait_for("the second error", lambda: page.is_visible("#banner"))
    assert "must be an absolute path" in tab.text("#banner-text")
    tab.shot("error")
    tab.check_clean(expected_statuses=(400,))


# Peers #######################################################################

def test_peers_panel_says_when_lan_sharing_is_off(start_server, tabs, tmp_path, make_gguf):
    srv = start_server(models_dir=tiny_store(tmp_path, make_gguf), wait_model=False)
    tab = tabs(srv)
    page = tab.page
    page.click("#tab-peers")
    wait_for("the peers panel", lambda: "LAN sharing is off (start with --p2p)" in tab.text("#peer-list"))
    page.set_viewport_size(NARROW)
    tab.shot("peers-off", dark=True)
    tab.check_clean()


@pytest.mark.slow
def test_peer_is_seen_and_a_model_pulled_from_it(lan, tabs, tmp_path, make_gguf):
    # Two machines on a LAN: network namespaces on a bridge this test (and
    # its Chromium) can reach; A has the model, B's page pulls it.
    a = lan.node("a", models=[(make_gguf("tiny.gguf"), "tiny")])
    b = lan.node("b")
    tab = tabs(b)
    page = tab.page
    page.click("#tab-peers")
    peer = page.locator(".peer").filter(has_text="tiny")
    wait_for("the other node and its model", lambda: peer.count() == 1, timeout=60)
    assert str(a.port) in peer.inner_text()
    peer.locator("tr", has_text="tiny").locator("button", has_text="Pull").click()
    job = page.locator("#peer-jobs .job")
    try:
        wait_for("the pull", lambda: job.count() == 1 and "done" in job.inner_text(), timeout=60)
    except AssertionError:
        raise AssertionError("the pull did not finish; page: %r; jobs: %r; banner: %r" % (
            page.locator("#peer-jobs").inner_text(), b.get("/v1/models/download")[1],
            page.locator("body").inner_text()[-600:]))
    assert "100%" in job.inner_text()
    assert any(m["id"] == "tiny" for m in b.get("/v1/models")[1]["data"])
    tab.shot("peers")
    tab.check_clean()


# The chat page: Markdown, conversations, per-message actions, files #########

AXE = os.environ.get("OFFGRID_AXE") or os.path.join(ROOT, ".ci", "node", "node_modules", "axe-core", "axe.min.js")

# What a reply may hold, stored as an export would: Markdown of every kind,
# and markup and addresses that must stay inert.
MARKDOWN_REPLY = "\n".join([
    "## Colours", "", "The **primary** colours are *three*:", "",
    "- red", "- blue", "  - a nested shade", "- yellow", "",
    "1. mix", "2. paint", "",
    "| Colour | Hex |", "|---|---:|", "| red | `#ff0000` |", "| blue | `#0000ff` |", "",
    "```python", "def mix(a, b):", "    return (a + b) / 2", "```", "",
    "See [the guide](https://example.org/colours) or [this](javascript:window.pwned=4).",
    '<img src=x onerror="window.pwned=5"> <script>window.pwned=6</script>',
])
CODE = "def mix(a, b):\n    return (a + b) / 2"


def conversation_file(tmp_path, conversations, name="saved.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"version": 1, "conversations": conversations}))
    return str(path)


def stored(conv_id, title, messages, updated=1):
    return {"id": conv_id, "title": title, "created": 1, "updated": updated,
            "settings": {"model": "", "system": "", "temperature": 0, "max_tokens": 32}, "messages": messages}


def show_list(page):
    """The conversation list: a side panel, or a drawer to open at phone width."""
    if page.is_visible("#conv-toggle") and not page.is_visible("#conv-list"):
        page.click("#conv-toggle")
        wait_for("the drawer", lambda: page.is_visible("#conv-list"))


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory, smol_store):
    """A server on SmolLM2-135M-Instruct, for replies whose content matters."""
    need("llama_cpp", "the chat page tests")
    from conftest import Server
    srv = Server(tmp_path_factory.mktemp("smol-home"), smol_store)
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]


@pytest.mark.parametrize("viewport", [WIDE, NARROW], ids=["desktop", "phone"])
def test_reply_markdown_renders_lists_tables_and_code_and_stays_inert(start_server, browser, tmp_path, make_gguf,
                                                                      viewport):
    srv = start_server(models_dir=tiny_store(tmp_path, make_gguf), wait_model=False)
    context = browser.new_context(viewport=viewport)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=srv.url)
    try:
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/ui")
        page.set_input_files("#conv-import", conversation_file(tmp_path, [stored("c1", "Colours", [
            {"role": "user", "content": "Tell me about colours"},
            {"role": "assistant", "content": MARKDOWN_REPLY}])]))
        show_list(page)
        page.locator('#conv-list li[data-conv="c1"] .open-conv').click()
        reply = page.locator(".msg.assistant .body")
        wait_for("the reply", lambda: reply.count() == 1)
        assert reply.locator("h4").inner_text() == "Colours"
        assert reply.locator("strong").inner_text() == "primary" and reply.locator("em").inner_text() == "three"
        assert reply.locator(":scope > ul > li").count() == 3 and reply.locator("ul ul > li").inner_text() == "a nested shade"
        assert reply.locator("ol > li").all_inner_texts() == ["mix", "paint"]
        assert reply.locator("table th").all_inner_texts() == ["Colour", "Hex"]
        assert reply.locator("table tbody tr").count() == 2
        assert reply.locator("table td code").first.inner_text() == "#ff0000"
        assert reply.locator(".code pre code").inner_text() == CODE
        assert reply.locator(".code-head").inner_text().startswith("python")
        # Links: http(s) only; the javascript: one stays as the text written.
        links = reply.locator("a")
        assert links.count() == 1 and links.get_attribute("href") == "https://example.org/colours"
        assert links.get_attribute("rel") == "noopener noreferrer nofollow"
        assert "[this](javascript:window.pwned=4)" in reply.inner_text()
        assert '<img src=x onerror="window.pwned=5">' in reply.inner_text()
        assert page.locator("#messages img, #messages script, #messages [onerror]").count() == 0
        # The code block's Copy button puts exactly the code in the clipboard.
        reply.locator(".code button.copy-code").click()
        wait_for("the copy", lambda: page.evaluate("() => navigator.clipboard.readText()") == CODE)
        assert reply.locator(".code button.copy-code").inner_text() == "Copied"
        page.locator(".msg.assistant .actions button.copy-message").click()
        wait_for("the message copy", lambda: page.evaluate("() => navigator.clipboard.readText()") == MARKDOWN_REPLY)
        assert page.evaluate("() => window.pwned") is None and errors == []
    finally:
        context.close()


@pytest.mark.slow
@pytest.mark.model
def test_conversations_survive_reload_export_delete_and_import(smol_server, tabs, tmp_path):
    tab = tabs(smol_server)
    page = tab.page
    wait_for("the model picker", lambda: page.input_value("#chat-model") == offgrid.STARTER["id"])
    page.click("#settings summary")
    page.fill("#max-tokens", "6")
    page.fill("#temperature", "0")
    for question in ("Say hello.", "Name a colour."):
        page.click("#new-chat")
        page.fill("#prompt", question)
        page.keyboard.press("Enter")
        wait_for("the reply to " + question, lambda: page.locator(".msg.assistant .meta").count() == 1, timeout=300)
    page.reload()
    wait_for("the list after reload", lambda: page.locator("#conv-list li[data-conv]").count() == 2)
    assert page.locator("#conv-list .open-conv").all_inner_texts() == ["Name a colour.", "Say hello."]
    # The open conversation came back with its messages and its settings.
    assert page.locator(".msg.user .body").inner_text() == "Name a colour."
    assert page.locator(".msg.assistant").count() == 1 and page.input_value("#max-tokens") == "6"
    # Rename, search.
    first = page.locator("#conv-list li[data-conv]").nth(1)
    first.locator("button", has_text="Rename").click()
    page.fill("#conv-list input", "Greeting")
    page.keyboard.press("Enter")
    wait_for("the new name", lambda: "Greeting" in page.locator("#conv-list").inner_text())
    page.fill("#conv-search", "greet")
    wait_for("the search", lambda: page.locator("#conv-list .open-conv").all_inner_texts() == ["Greeting"])
    page.fill("#conv-search", "colour")   # matches the text of messages too
    wait_for("the search by text", lambda: page.locator("#conv-list .open-conv").all_inner_texts() == ["Name a colour."])
    page.fill("#conv-search", "")
    # Export, delete both, import: everything is back.
    with page.expect_download() as download:
        page.click("#conv-export")
    saved = str(tmp_path / "export.json")
    download.value.save_as(saved)
    with open(saved) as f:
        exported = json.load(f)["conversations"]
    assert sorted(c["title"] or c["messages"][0]["content"] for c in exported) == ["Greeting", "Name a colour."]
    before = stored_conversations(page)
    for _ in range(2):
        page.locator("#conv-list li[data-conv]").first.locator("button", has_text="Delete").click()
        page.locator("#conv-list button", has_text="Yes, delete").click()
    wait_for("the empty list", lambda: page.locator("#conv-list li[data-conv]").count() == 0)
    assert page.locator(".msg").count() == 0
    page.set_input_files("#conv-import", saved)
    wait_for("the imported list", lambda: page.locator("#conv-list li[data-conv]").count() == 2)
    assert "Imported 2 conversations" in page.inner_text("#conv-note")
    assert stored_conversations(page) == before
    page.reload()
    wait_for("the list after another reload", lambda: page.locator("#conv-list li[data-conv]").count() == 2)
    # A file that is not an export changes nothing and says why.
    bad = tmp_path / "bad.json"
    bad.write_text('{"conversations": [{"id": 5}]}')
    page.set_input_files("#conv-import", str(bad))
    wait_for("the refusal", lambda: page.is_visible("#banner"))
    assert "not in the form Export writes" in tab.text("#banner-text")
    assert stored_conversations(page) == before
    tab.check_clean()


@pytest.mark.slow
@pytest.mark.model
def test_regenerate_edit_figures_and_escape(smol_server, tabs):
    tab = tabs(smol_server)
    page = tab.page
    wait_for("the model picker", lambda: page.input_value("#chat-model") == offgrid.STARTER["id"])
    page.click("#settings summary")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#prompt", "What are the three primary colours?")
    page.keyboard.press("Enter")
    meta = page.locator(".msg.assistant .meta")
    wait_for("the reply", lambda: meta.count() == 1, timeout=300)
    reply = page.locator(".msg.assistant .body").inner_text().lower()
    assert all(c in reply for c in ("red", "blue", "yellow")), reply
    # The figures come from the stream's usage: model, tokens, speed, first token.
    assert tab.chat_requests()[0]["stream_options"] == {"include_usage": True}
    figures = meta.inner_text()
    assert re.fullmatch(r"%s \u2022 24 tokens \u2022 [0-9.]+ tok/s \u2022 first token \d+ ms" % re.escape(
        offgrid.STARTER["id"]), figures), figures

    # Regenerate: the same conversation is asked again, and the reply replaced.
    page.locator(".msg.assistant .actions button", has_text="Regenerate").click()
    wait_for("the second reply", lambda: len(tab.chat_requests()) == 2 and meta.count() == 1 and
             page.is_enabled("#send"), timeout=300)
    first, again = tab.chat_requests()
    assert again["messages"] == first["messages"] and page.locator(".msg").count() == 2

    # Edit the question: the conversation is cut there and asked again.
    page.locator(".msg.user .actions button", has_text="Edit").click()
    page.fill(".msg.user textarea", "Name one fruit.")
    page.keyboard.press("Enter")
    wait_for("the reply to the edit", lambda: len(tab.chat_requests()) == 3 and meta.count() == 1 and
             page.is_enabled("#send"), timeout=300)
    edited = tab.chat_requests()[2]
    assert [m["content"] for m in edited["messages"]] == ["Name one fruit."]
    assert page.locator(".msg.user .body").inner_text() == "Name one fruit." and page.locator(".msg").count() == 2
    assert [m["content"] for m in stored_conversations(page)[0]["messages"]][:1] == ["Name one fruit."]

    # Esc stops a reply.
    page.fill("#max-tokens", "400")
    page.fill("#prompt", "Write a long story about a lighthouse keeper.")
    page.keyboard.press("Enter")
    growing = page.locator(".msg.assistant .body").nth(1)
    wait_for("the long reply to start", lambda: len(growing.inner_text()) > 5, timeout=300)
    page.keyboard.press("Escape")
    note = page.locator(".msg.assistant").nth(1).locator(".note")
    wait_for("the stop", lambda: note.count() == 1 and note.inner_text() == "(stopped)")
    assert page.is_enabled("#send")
    tab.check_clean()


@pytest.mark.slow
@pytest.mark.model
def test_attached_file_reaches_the_prompt_and_a_too_big_one_is_refused(smol_server, tabs, tmp_path):
    tab = tabs(smol_server)
    page = tab.page
    wait_for("the model picker", lambda: page.input_value("#chat-model") == offgrid.STARTER["id"])
    page.click("#settings summary")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "8")
    notes = tmp_path / "notes.txt"
    notes.write_text("Ship's log, day 12.\nThe water tank holds 400 litres. The secret word is PAPAYA.\n")
    page.set_input_files("#attach", str(notes))
    chip = page.locator('#attached .chip[data-file="notes.txt"]')
    wait_for("the file chip", lambda: chip.count() == 1)
    tokens = int(re.search(r"(\d+) tokens", chip.inner_text()).group(1))
    question = "What is the secret word?"
    page.fill("#prompt", question)
    page.keyboard.press("Enter")
    meta = page.locator(".msg.assistant .meta")
    wait_for("the reply", lambda: meta.count() == 1, timeout=300)
    sent = [r for r in tab.chat_requests() if r.get("stream")][0]["messages"][-1]["content"]
    assert sent.startswith("File: notes.txt\n```\nShip's log, day 12.\n") and sent.endswith(question)
    assert "The secret word is PAPAYA." in sent and chip.count() == 0
    assert page.locator(".msg.user .files").inner_text() == "notes.txt \u2022 %d tokens" % tokens
    # The server counted the file in the prompt: more tokens than the question alone, by the file's count.
    with_file = stored_conversations(page)[0]["messages"][1]["meta"]["prompt_tokens"]
    status, alone, _ = smol_server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": question}], "max_tokens": 1})
    assert status == 200
    assert abs(with_file - (alone["usage"]["prompt_tokens"] + tokens)) <= 3, (with_file, alone["usage"], tokens)

    # A file larger than the model's context is refused, and nothing is attached.
    big = tmp_path / "big.csv"
    big.write_text("\n".join("row %d,%d,%d" % (i, i * 7, i * 13) for i in range(2000)))
    page.set_input_files("#attach", str(big))
    wait_for("the refusal", lambda: page.is_visible("#banner"), timeout=300)
    assert tab.text("#banner-text").startswith("Attach big.csv: ")
    assert page.locator("#attached .chip").count() == 0
    tab.check_clean(expected_statuses=(400,))


def test_every_tab_has_no_serious_accessibility_problems_at_both_widths(start_server, browser, tmp_path, make_gguf):
    if not os.path.isfile(AXE):
        message = "axe-core is missing at %s (npm install axe-core, as .ci/run does)" % AXE
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    srv = start_server(models_dir=tiny_store(tmp_path, make_gguf), wait_model=False)
    with open(AXE) as f:
        axe = f.read()
    problems = []
    for viewport in (WIDE, NARROW):
        # axe is injected as a script of its own: the page's policy would refuse it, so this context skips it.
        context = browser.new_context(viewport=viewport, bypass_csp=True)
        try:
            page = context.new_page()
            page.goto(srv.url + "/ui")
            page.set_input_files("#conv-import", conversation_file(tmp_path, [stored("c1", "Colours", [
                {"role": "user", "content": "Tell me about colours"},
                {"role": "assistant", "content": MARKDOWN_REPLY}])]))
            show_list(page)
            page.locator('#conv-list li[data-conv="c1"] .open-conv').click()
            wait_for("the reply", lambda: page.locator(".msg.assistant").count() == 1)
            page.add_script_tag(content=axe)
            for name in ("chat", "models", "peers", "system"):
                page.click("#tab-" + name)
                wait_for("the %s tab" % name, lambda: page.is_visible("#" + name))
                if name == "models":
                    wait_for("the catalog", lambda: page.locator("#catalog tbody tr").count() > 3)
                for scheme in ("light", "dark"):
                    page.emulate_media(color_scheme=scheme)
                    result = page.evaluate("async () => (await axe.run(document, {resultTypes: ['violations']}))"
                                           ".violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
                                           " nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 3)}))")
                    problems += [(name, viewport["width"], scheme, v) for v in result
                                 if v["impact"] in ("serious", "critical")]
                page.emulate_media(color_scheme="light")
                os.makedirs(ARTIFACTS, exist_ok=True)
                page.screenshot(path=os.path.join(ARTIFACTS, "tab-%s-%d.png" % (name, viewport["width"])),
                                full_page=True)
        finally:
            context.close()
    assert problems == [], problems
    for name in ("chat", "models", "peers", "system"):
        for width in (1280, 390):
            assert os.path.getsize(os.path.join(ARTIFACTS, "tab-%s-%d.png" % (name, width))) > 1000


def test_dark_mode_follows_the_system_until_toggled(start_server, tabs, tmp_path, make_gguf):
    srv = start_server(models_dir=tiny_store(tmp_path, make_gguf), wait_model=False)
    tab = tabs(srv)
    page = tab.page
    background = "() => getComputedStyle(document.body).backgroundColor"
    page.emulate_media(color_scheme="dark")
    wait_for("the dark page", lambda: page.evaluate(background) == "rgb(21, 23, 26)")
    assert page.inner_text("#theme-toggle") == "Light"
    page.click("#theme-toggle")
    wait_for("the light page", lambda: page.evaluate(background) == "rgb(247, 247, 245)")
    assert page.get_attribute("#theme-toggle", "aria-pressed") == "false"
    page.reload()
    wait_for("the choice kept", lambda: page.evaluate(background) == "rgb(247, 247, 245)")
    page.click("#theme-toggle")
    page.emulate_media(color_scheme="light")
    wait_for("dark chosen on a light system", lambda: page.evaluate(background) == "rgb(21, 23, 26)")
    tab.check_clean()
