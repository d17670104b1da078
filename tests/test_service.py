"""`offgrid install-service` writes a systemd unit that systemd accepts."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request

import pytest

from conftest import IN_CI, OFFGRID, need_root_and, run_cli, wait_for


def test_generated_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        if IN_CI:
            pytest.fail("systemd-analyze is missing: .ci/run installs Debian's systemd package")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    unit = tmp_path / "offgrid.service"
    r = run_cli(["install-service", "--output", str(unit), "--serve-args", "--port 8080"], tmp_path)
    assert r.returncode == 0, r.stderr
    text = unit.read_text()
    assert "User=offgrid" in text and "Restart=on-failure" in text and "NoNewPrivileges=yes" in text
    assert " serve --port 8080" in text
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), out.stdout + out.stderr


def test_unit_to_stdout_and_root_user_refused(tmp_path):
    r = run_cli(["install-service", "--output", "-"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("# OffGrid LLM")
    r = run_cli(["install-service", "--user", "root", "--output", "-"], tmp_path)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "non-root" in r.stderr


def exec_start(unit):
    """The unit's ExecStart as an argument list, unquoted as systemd does."""
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    return [a.replace("$$", "$").replace("%%", "%") for a in shlex.split(line[len("ExecStart="):])]


def test_service_starts_from_the_bytecode_it_caches_with_a_read_only_program_folder(tmp_path):
    need_root_and(["unshare", "mount"], "a read-only bind mount needs root")
    program, home, cache = tmp_path / "opt", tmp_path / "state", tmp_path / "cache"
    for folder in (program, home, cache):
        folder.mkdir()
    shutil.copy(OFFGRID, str(program))
    unit = subprocess.run([sys.executable, str(program / "offgrid.py"), "install-service", "--output", "-",
                           "--serve-args", "--port 0"], capture_output=True, text=True, check=True).stdout
    argv = exec_start(unit)
    assert argv[1] == "-c" and argv[-3:] == ["serve", "--port", "0"] and "import offgrid" in argv[2]
    env = {"PATH": os.environ["PATH"]}
    for line in unit.splitlines():
        if line.startswith("Environment="):
            name, value = line[len("Environment="):].split("=", 1)
            env[name] = value.replace("/var/lib/offgrid", str(home)).replace("/var/cache/offgrid", str(cache))
    assert env["PYTHONPYCACHEPREFIX"].startswith(str(cache)) and "CacheDirectory=offgrid" in unit
    # As under ProtectSystem=strict: the program folder is read-only. -S keeps
    # the starter package out of sight, so the server starts without a model.
    command = "mount --bind -o ro {0} {0} && exec {1}".format(
        shlex.quote(str(program)), " ".join(shlex.quote(a) for a in [argv[0], "-S"] + argv[1:]))
    pyc = os.path.join(env["PYTHONPYCACHEPREFIX"] + str(program), "offgrid.cpython-%d%d.pyc" % sys.version_info[:2])
    written = []
    for start in range(2):
        log = open(str(home / "serve.log"), "w+")
        proc = subprocess.Popen(["unshare", "-m", "sh", "-c", command], env=env, cwd=str(home), stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            url = wait_for("the service to listen", lambda: proc.poll() is None and re.search(
                r"listening url=(http://[0-9.]+:\d+)", open(log.name).read()) or proc.poll() is not None)
            assert proc.poll() is None, open(log.name).read()
            with urllib.request.urlopen(url.group(1) + "/health", timeout=30) as r:
                assert r.status == 200
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
        assert not (program / "__pycache__").exists()
        written.append(os.stat(pyc).st_mtime_ns)  # the first start compiled offgrid.py into the cache
    assert written[1] == written[0]  # and the second one read it: nothing compiled again
