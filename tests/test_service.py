"""`offgrid install-service` writes a systemd unit that systemd accepts."""

import shutil
import subprocess

import pytest

from conftest import IN_CI, run_cli


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
