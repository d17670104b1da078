"""The appliance builds of appliance/: the Raspberry Pi SD image, the arm64
.deb (Debian bookworm and JetPack 6), and the aarch64 zipapp, each run for
real on arm64 and asked the golden question (tests/golden_model.py).

- The .deb and the aarch64 pyz are installed in the arm64 Debian rootfs that
  build-image.sh makes, and run there under qemu-user, serving on 127.0.0.1.
- The image is checked as a file (partition table, labels and UUIDs against
  fstab and cmdline.txt, Pi firmware and device trees, e2fsck, enabled units)
  and booted with qemu-system-aarch64 -M virt using the kernel and initrd from
  its own FAT partition; its port is forwarded to 127.0.0.1 only. It is also
  booted as a Raspberry Pi 3 (-M raspi3b, the card on the SD controller).

Needs root (chroot, binfmt_misc) and the Debian packages .ci/run installs.
The first run builds the arm64 rootfs (8 to 11 minutes) and the aarch64 wheel
(about 5 minutes) into the build cache; later runs reuse them. On a warm
cache the whole file (11 tests) took 6.5 minutes on a busy 2-core machine:
image build 0.8 min, the two .debs 1.7 min, QEMU virt boot 1 min, Raspberry
Pi 3 boot 2.6 min, zipapp 0.5 min.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import IN_CI, need, need_root_and, unpacked_root

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPLIANCE = os.path.join(ROOT, "appliance")
TOOLS = ["mmdebstrap", "qemu-aarch64-static", "update-binfmts", "qemu-system-aarch64", "mcopy", "mtype",
         "mkfs.vfat", "mkfs.ext4", "debugfs", "e2fsck", "sfdisk", "blkid", "zstd", "dpkg-deb", "shellcheck"]
# The unit imports offgrid from /opt/offgrid, so it starts from bytecode.
SERVICE_START = ("ExecStart=/usr/bin/python3 -c \"import sys; sys.path[0] = '/opt/offgrid'; import offgrid; "
                 "sys.exit(offgrid.main())\" serve\n")
SCRIPTS = ["build-image.sh", "build-deb.sh", "install-jetson.sh", "vendor.sh", "firstboot.sh", "offgrid-cli.sh"]
BOOT_TIMEOUT = 600  # TCG emulation on a loaded 2-core machine

pytestmark = pytest.mark.slow


def need_appliance_tools():
    """Root and the image tools; a missing one skips here and fails in CI."""
    need_root_and(TOOLS, "the appliance builds need root (chroot, binfmt_misc, file ownership)")


def run(cmd, timeout=1800, **kw):
    """Run a build step; on failure the assertion shows its output."""
    started = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert p.returncode == 0, "%s exited %s\n%s\n%s" % (" ".join(cmd), p.returncode, p.stdout[-3000:],
                                                         p.stderr[-6000:])
    sys.stderr.write("%s: %.1f s\n" % (" ".join(os.path.basename(c) for c in cmd[:2]), time.monotonic() - started))
    return p


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, key=None, timeout=300):
    """(status, parsed body) of one request."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["Authorization"] = "Bearer " + key
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


# Fixtures #####################################################################

@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """(model path, golden answer from the venv's llama-cpp-python)."""
    need("llama_cpp", "the golden answer of the appliance tests")
    path = golden_model.write_model(str(tmp_path_factory.mktemp("golden") / golden_model.MODEL_FILE))
    return path, golden_model.golden_text(path)


@pytest.fixture(scope="module")
def aarch64_wheel():
    need_appliance_tools()
    out = run([os.path.join(ROOT, "build", "wheels.sh"), "aarch64"], timeout=3600).stdout.split()
    assert out and out[-1].endswith("linux_aarch64.whl"), out
    return out[-1]


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    """The image's arm64 rootfs, unpacked, with /proc mounted; a folder made
    at the rootfs's own host path, linked to /, lets host paths under it
    (a Serve home) name the same files inside the chroot."""
    need_appliance_tools()
    tarball = run([os.path.join(APPLIANCE, "build-image.sh"), "--rootfs-only"], timeout=3600).stdout.split()[-1]
    root = str(tmp_path_factory.mktemp("rootfs"))
    with unpacked_root(tarball, root, proc=True):
        yield root


@pytest.fixture(scope="module")
def image(request, tmp_path_factory, golden):
    """The SD image, built with the golden model in its model store.
    OFFGRID_APPLIANCE_IMAGE=PATH reuses one built so, for local iteration."""
    if os.environ.get("OFFGRID_APPLIANCE_IMAGE"):
        assert not IN_CI, "CI builds the image; unset OFFGRID_APPLIANCE_IMAGE"
        return os.environ["OFFGRID_APPLIANCE_IMAGE"]
    wheel = request.getfixturevalue("aarch64_wheel")
    out = tmp_path_factory.mktemp("image")
    p = run([os.path.join(APPLIANCE, "build-image.sh"), "--wheel", wheel, "--model", golden[0],
             "--out", str(out)], timeout=3600)
    sys.stderr.write(p.stderr)
    img = p.stdout.split()[-1]
    assert os.path.isfile(img) and img.endswith("-rpi-arm64.img"), p.stdout
    return img


def partitions(img):
    table = json.loads(run(["sfdisk", "--json", img]).stdout)["partitiontable"]
    return table, [dict(p, offset=p["start"] * table.get("sectorsize", 512)) for p in table["partitions"]]


def blkid(img, offset):
    out = run(["blkid", "-p", "-O", str(offset), "-o", "export", img]).stdout
    return dict(line.split("=", 1) for line in out.split())


def debugfs_cat(img, offset, path):
    return run(["debugfs", "-R", "cat " + path, "%s?offset=%d" % (img, offset)]).stdout


def debugfs_ls(img, offset, path):
    return run(["debugfs", "-R", "ls -l " + path, "%s?offset=%d" % (img, offset)]).stdout


def stop_qemu(qemu):
    """Power the emulated machine off: SIGTERM, then SIGKILL after 30 s."""
    qemu.terminate()
    try:
        qemu.wait(30)
    except subprocess.TimeoutExpired:
        qemu.kill()
        qemu.wait()


# Scripts ######################################################################

def test_appliance_scripts_pass_shellcheck():
    # install-jetson.sh cannot run here (no Jetson, no CUDA): this is its check.
    need_appliance_tools()
    for name in SCRIPTS:
        p = subprocess.run(["shellcheck", os.path.join(APPLIANCE, name)], capture_output=True, text=True)
        assert p.returncode == 0, "%s:\n%s" % (name, p.stdout)


def test_build_scripts_reject_bad_options():
    for script, args, message in [("build-image.sh", ["--initramfs", "all"], "--initramfs must be list or most"),
                                  ("build-deb.sh", ["--python", "3.8"], "--python must be 3.10"),
                                  ("build-image.sh", ["--bogus"], "unknown argument --bogus")]:
        p = subprocess.run([os.path.join(APPLIANCE, script)] + args, capture_output=True, text=True)
        assert p.returncode != 0 and message in p.stderr, (script, p.stderr)
    p = subprocess.run([os.path.join(APPLIANCE, "install-jetson.sh")], capture_output=True, text=True)
    assert p.returncode != 0 and "install-jetson:" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr


# The .deb #####################################################################

def test_deb_for_jetpack6_targets_python_3_10(tmp_path, aarch64_wheel):
    p = run([os.path.join(APPLIANCE, "build-deb.sh"), "--python", "3.10", "--wheel", aarch64_wheel,
             "--out", str(tmp_path)], timeout=900)
    deb = p.stdout.split()[-1]
    assert os.path.basename(deb) == "offgrid-llm_%s+py310_arm64.deb" % offgrid_version()
    info = run(["dpkg-deb", "-f", deb, "Architecture", "Depends"]).stdout
    assert "Architecture: arm64" in info
    assert "python3 (>= 3.10), python3 (<< 3.11)" in info and "libgomp1" in info
    files = run(["dpkg-deb", "-c", deb]).stdout
    assert "./opt/offgrid/offgrid.py" in files
    assert "./lib/systemd/system/offgrid.service" in files
    assert re.search(r"numpy/_core/_multiarray_umath\.cpython-310-aarch64-linux-gnu\.so|"
                     r"numpy/core/_multiarray_umath\.cpython-310-aarch64-linux-gnu\.so", files), files
    assert "./opt/offgrid/site/llama_cpp/lib/libllama.so" in files


def test_deb_installs_and_answers_golden_in_arm64_rootfs(tmp_path, rootfs, aarch64_wheel, golden):
    p = run([os.path.join(APPLIANCE, "build-deb.sh"), "--python", "3.11", "--wheel", aarch64_wheel,
             "--out", str(tmp_path)], timeout=900)
    deb = p.stdout.split()[-1]
    shutil.copy(deb, os.path.join(rootfs, "tmp", "offgrid.deb"))
    run(["chroot", rootfs, "dpkg", "-i", "/tmp/offgrid.deb"], timeout=600)
    assert os.path.islink(os.path.join(rootfs, "etc/systemd/system/multi-user.target.wants/offgrid.service"))
    assert "offgrid:" in open(os.path.join(rootfs, "etc/passwd")).read()
    unit = open(os.path.join(rootfs, "lib/systemd/system/offgrid.service")).read()
    assert SERVICE_START in unit
    assert "User=offgrid" in unit
    dropin = open(os.path.join(rootfs, "lib/systemd/system/offgrid.service.d/site.conf")).read()
    assert "Environment=PYTHONPATH=/opt/offgrid/site" in dropin
    # postinst compiled /opt/offgrid, and the service reads that bytecode.
    assert "Environment=PYTHONPYCACHEPREFIX=\n" in dropin
    pycache = os.listdir(os.path.join(rootfs, "opt/offgrid/__pycache__"))
    assert "offgrid.cpython-311.pyc" in pycache, pycache
    # The command root uses: runs as offgrid, sees the vendored llama-cpp-python.
    version = run(["chroot", rootfs, "offgrid", "version"], timeout=300).stdout
    assert "llama-cpp-python 0.3" in version, version
    # docs/appliance.md's "Change the key": root's `offgrid keys` writes the
    # service's keys.json, as the service's user.
    created = json.loads(run(["chroot", rootfs, "offgrid", "keys", "create", "--name", "laptop", "--json"],
                             timeout=300).stdout)
    assert created["key"].startswith("og-") and created["name"] == "laptop"
    keys = os.path.join(rootfs, "var/lib/offgrid/keys.json")
    uid = int(re.search(r"^offgrid:x:(\d+):", open(os.path.join(rootfs, "etc/passwd")).read(), re.M).group(1))
    assert os.stat(keys).st_uid == uid
    run(["chroot", rootfs, "offgrid", "keys", "revoke", "laptop"], timeout=300)
    assert "laptop" not in open(keys).read()

    home = os.path.join(rootfs, "var/tmp/deb-home")
    cmd = ["chroot", rootfs, "env", "PYTHONPATH=/opt/offgrid/site", "/usr/bin/python3", "/opt/offgrid/offgrid.py"]
    with golden_model.Serve(cmd, home, golden[0], timeout=600) as srv:
        status, health = srv.request("GET", "/health")
        assert status == 200
        started = time.monotonic()
        assert srv.chat(timeout=600) == golden[1]
        sys.stderr.write("deb: golden chat under qemu-user in %.1f s\n" % (time.monotonic() - started))
        assert srv.stop() == 0

    run(["chroot", rootfs, "dpkg", "--purge", "offgrid-llm"], timeout=600)
    assert not os.path.exists(os.path.join(rootfs, "opt/offgrid"))
    assert not os.path.lexists(os.path.join(rootfs, "etc/systemd/system/multi-user.target.wants/offgrid.service"))


# The aarch64 zipapp ###########################################################

def test_aarch64_pyz_answers_golden_in_arm64_rootfs(tmp_path, rootfs, aarch64_wheel, golden):
    zipapp = os.path.join(ROOT, "build", "zipapp.sh")
    assert os.path.isfile(zipapp), "build/zipapp.sh is missing"
    pyz = run([zipapp, "aarch64"], timeout=1800).stdout.split()[-1]
    assert pyz.endswith("-aarch64.pyz"), pyz
    shutil.copy(pyz, os.path.join(rootfs, "var/tmp/offgrid.pyz"))
    home = os.path.join(rootfs, "var/tmp/pyz-home")
    # A read-only system: extraction goes where SHIV_ROOT says.
    cmd = ["chroot", rootfs, "python3", "/var/tmp/offgrid.pyz"]
    with golden_model.Serve(cmd, home, golden[0], env={"SHIV_ROOT": "/var/tmp/shiv"}, timeout=600) as srv:
        assert srv.chat(timeout=600) == golden[1]
        assert srv.stop() == 0
    assert os.listdir(os.path.join(rootfs, "var/tmp/shiv"))


# The SD image #################################################################

def offgrid_version():
    return re.search(r'^__version__ = "(.*)"$', open(os.path.join(ROOT, "offgrid.py")).read(), re.M).group(1)


def test_image_is_compressed_with_checksums(image):
    out = os.path.dirname(image)
    assert os.path.basename(image) == "offgrid-%s-rpi-arm64.img" % offgrid_version()
    run(["sha256sum", "-c", "SHA256SUMS"], cwd=out)
    sums = open(os.path.join(out, "SHA256SUMS")).read()
    assert os.path.basename(image) + ".zst" in sums
    run(["zstd", "-t", "-q", image + ".zst"])


def test_image_partitions_labels_and_uuids_match_fstab_and_cmdline(image):
    table, (boot, root) = partitions(image)
    assert table["label"] == "dos"
    assert boot["type"] == "c" and boot.get("bootable") and boot["start"] == 8192
    assert root["type"] == "83" and root["start"] == boot["start"] + boot["size"]
    assert root["start"] + root["size"] <= os.path.getsize(image) // 512
    b, r = blkid(image, boot["offset"]), blkid(image, root["offset"])
    assert (b["TYPE"], b["LABEL"]) == ("vfat", "RASPIFIRM"), b
    assert (r["TYPE"], r["LABEL"]) == ("ext4", "RASPIROOT"), r

    fstab = debugfs_cat(image, root["offset"], "/etc/fstab")
    assert re.search(r"^UUID=%s\s+/\s+ext4\s" % r["UUID"], fstab, re.M), fstab
    assert re.search(r"^UUID=%s\s+/boot/firmware\s+vfat\s" % b["UUID"], fstab, re.M), fstab
    img_at = "%s@@%d" % (image, boot["offset"])
    cmdline = run(["mtype", "-i", img_at, "::/cmdline.txt"]).stdout
    assert "root=UUID=%s " % r["UUID"] in cmdline + " ", cmdline
    assert "ROOTPART=UUID=%s" % r["UUID"] in debugfs_cat(image, root["offset"], "/etc/default/raspi-firmware")


def test_image_has_pi_firmware_device_trees_and_kernel(image):
    _, (boot, root) = partitions(image)
    img_at = "%s@@%d" % (image, boot["offset"])
    files = run(["mdir", "-b", "-i", img_at, "::/"]).stdout
    names = {os.path.basename(line.strip()) for line in files.splitlines()}
    for wanted in ["bootcode.bin", "start4.elf", "fixup4.dat", "start.elf", "fixup.dat", "config.txt",
                   "cmdline.txt", "bcm2711-rpi-4-b.dtb", "bcm2837-rpi-3-b.dtb", "bcm2837-rpi-3-b-plus.dtb"]:
        assert wanted in names, (wanted, sorted(names))
    kernels = [n for n in names if n.startswith("vmlinuz-")]
    assert len(kernels) == 1 and "initrd.img-" + kernels[0][len("vmlinuz-"):] in names, sorted(names)
    config = run(["mtype", "-i", img_at, "::/config.txt"]).stdout
    assert "arm_64bit=1" in config
    assert re.search(r"^kernel=%s$" % re.escape(kernels[0]), config, re.M), config
    assert re.search(r"^initramfs initrd\.img-%s$" % re.escape(kernels[0][len("vmlinuz-"):]), config, re.M), config
    # The root file system leaves /boot/firmware empty for the FAT partition.
    listing = debugfs_ls(image, root["offset"], "/boot/firmware")
    assert "start4.elf" not in listing


def test_image_root_is_clean_and_runs_offgrid_as_a_service(image):
    _, (boot, root) = partitions(image)
    at = "%s?offset=%d" % (image, root["offset"])
    p = subprocess.run(["e2fsck", "-fn", at], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert debugfs_cat(image, root["offset"], "/etc/hostname").strip() == "offgrid"
    wants = debugfs_ls(image, root["offset"], "/etc/systemd/system/multi-user.target.wants")
    for unit in ["offgrid.service", "offgrid-firstboot.service", "systemd-networkd.service", "avahi-daemon.service"]:
        assert unit in wants, wants
    assert "ssh.service" not in wants  # only with an authorized_keys file, at first boot
    unit = debugfs_cat(image, root["offset"], "/etc/systemd/system/offgrid.service")
    assert SERVICE_START in unit
    assert "User=offgrid" in unit and "ProtectSystem=strict" in unit
    # The service reads the bytecode the image was built with.
    dropin = debugfs_cat(image, root["offset"], "/etc/systemd/system/offgrid.service.d/appliance.conf")
    assert "Environment=PYTHONPYCACHEPREFIX=\n" in dropin
    assert "offgrid.cpython-311.pyc" in debugfs_ls(image, root["offset"], "/opt/offgrid/__pycache__")
    config = json.loads(debugfs_cat(image, root["offset"], "/var/lib/offgrid/config.json"))
    assert config["host"] == "0.0.0.0"
    models = debugfs_ls(image, root["offset"], "/var/lib/offgrid/models")
    assert golden_model.MODEL_FILE in models
    passwd = debugfs_cat(image, root["offset"], "/etc/passwd")
    uid = re.search(r"^offgrid:x:(\d+):", passwd, re.M)
    assert uid and int(uid.group(1)) < 1000, passwd
    # No SSH host keys baked in: every card makes its own at first boot.
    assert "ssh_host_" not in debugfs_ls(image, root["offset"], "/etc/ssh")


def test_image_boots_in_qemu_and_answers_golden(image, golden, tmp_path):
    _, (boot, root) = partitions(image)
    # Boot a copy with room to grow, as a card larger than the image.
    disk = str(tmp_path / "card.img")
    run(["cp", "--sparse=always", image, disk])
    with open(disk, "r+b") as f:
        f.truncate(os.path.getsize(image) + 512 * 1024 * 1024)
    img_at = "%s@@%d" % (disk, boot["offset"])
    names = run(["mdir", "-b", "-i", img_at, "::/"]).stdout.split()
    kernel = next(os.path.basename(n) for n in names if os.path.basename(n).startswith("vmlinuz-"))
    initrd = "initrd.img-" + kernel[len("vmlinuz-"):]
    for name in (kernel, initrd):
        run(["mcopy", "-n", "-i", img_at, "::/" + name, str(tmp_path / name)])
    cmdline = run(["mtype", "-i", img_at, "::/cmdline.txt"]).stdout.split()
    root_arg = next(a for a in cmdline if a.startswith("root="))

    port = free_port()
    serial = tmp_path / "serial.log"
    started = time.monotonic()
    qemu = subprocess.Popen([
        "qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72", "-smp", "2", "-m", "1024",
        "-accel", "tcg,thread=multi", "-kernel", str(tmp_path / kernel), "-initrd", str(tmp_path / initrd),
        "-append", "%s rw rootwait console=ttyAMA0" % root_arg,
        "-drive", "file=%s,if=none,format=raw,id=hd0" % disk, "-device", "virtio-blk-pci,drive=hd0",
        "-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:%d-:11611" % port, "-device", "virtio-net-pci,netdev=n0",
        "-display", "none", "-monitor", "none", "-serial", "file:%s" % serial,
    ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = "http://127.0.0.1:%d" % port
    try:
        key, health = None, None
        while time.monotonic() - started < BOOT_TIMEOUT:
            assert qemu.poll() is None, "qemu exited %s: %s" % (qemu.returncode, qemu.stderr.read())
            log = serial.read_text(errors="replace") if serial.exists() else ""
            found = re.search(r"OFFGRID API KEY: (\S+)", log)
            key = found.group(1) if found else None
            try:
                status, health = http("GET", url + "/health", timeout=10)
                if status == 200 and key:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(2)
        else:
            pytest.fail("no /health and API key within %d s; serial console:\n%s" % (
                BOOT_TIMEOUT, serial.read_text(errors="replace")[-6000:]))
        boot_s = time.monotonic() - started
        assert health["status"] == "ok", health
        log = serial.read_text(errors="replace")
        assert "hostname offgrid" in log, log[-4000:]
        assert re.search(r"Started \S*avahi-daemon\.service", log), log[-4000:]  # offgrid.local
        grown = re.search(r"root file system \S+: (\d+)M before, (\d+)M now", log)
        assert grown and int(grown.group(2)) > int(grown.group(1)) + 400, log[-4000:]

        # Listening on the LAN address with the key from the first boot.
        status, body = http("GET", url + "/v1/models")
        assert status == 401 and body["error"]["code"], body
        status, body = http("GET", url + "/v1/models", key=key)
        assert status == 200 and golden_model.MODEL_ID in [m["id"] for m in body["data"]], body
        chat_started = time.monotonic()
        status, body = http("POST", url + "/v1/chat/completions", golden_model.REQUEST, key=key, timeout=600)
        chat_s = time.monotonic() - chat_started
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == golden[1]
        # The key is on the boot partition too, for a Pi without a screen.
        assert key in run(["mtype", "-i", img_at, "::/offgrid-api-key.txt"]).stdout
        sys.stderr.write("boot: /health and key after %.1f s, golden chat in %.1f s\n" % (boot_s, chat_s))
    finally:
        stop_qemu(qemu)


def test_image_boots_as_a_raspberry_pi_3_from_its_sd_card(image, tmp_path):
    # QEMU 7.2 has no Pi 4 machine; its raspi3b runs the Pi device tree from
    # the image and reads the card through the Pi's SD controller, so this
    # checks the small initramfs finds the root on mmcblk0p2. It has no
    # network: the serial console is what is checked.
    _, (boot, root) = partitions(image)
    card = str(tmp_path / "card.img")
    run(["cp", "--sparse=always", image, card])
    with open(card, "r+b") as f:
        f.truncate(2 * 1024 ** 3)  # an SD card's size must be a power of 2
    img_at = "%s@@%d" % (card, boot["offset"])
    names = [os.path.basename(n) for n in run(["mdir", "-b", "-i", img_at, "::/"]).stdout.split()]
    kernel = next(n for n in names if n.startswith("vmlinuz-"))
    initrd = "initrd.img-" + kernel[len("vmlinuz-"):]
    for name in (kernel, initrd, "bcm2837-rpi-3-b.dtb"):
        run(["mcopy", "-n", "-i", img_at, "::/" + name, str(tmp_path / name)])
    root_arg = next(a for a in run(["mtype", "-i", img_at, "::/cmdline.txt"]).stdout.split()
                    if a.startswith("root="))
    serial = tmp_path / "serial.log"
    started = time.monotonic()
    qemu = subprocess.Popen([
        "qemu-system-aarch64", "-M", "raspi3b", "-dtb", str(tmp_path / "bcm2837-rpi-3-b.dtb"),
        "-kernel", str(tmp_path / kernel), "-initrd", str(tmp_path / initrd),
        "-append", "%s rw rootwait console=ttyAMA0" % root_arg,
        "-drive", "file=%s,if=sd,format=raw" % card,
        "-display", "none", "-monitor", "none", "-serial", "file:%s" % serial,
    ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        log = ""
        while time.monotonic() - started < BOOT_TIMEOUT:
            assert qemu.poll() is None, "qemu exited %s: %s" % (qemu.returncode, qemu.stderr.read())
            log = serial.read_text(errors="replace") if serial.exists() else ""
            if "offgrid-firstboot: hostname offgrid" in log:
                break
            time.sleep(2)
        else:
            pytest.fail("the first boot did not finish within %d s; serial console:\n%s" % (
                BOOT_TIMEOUT, log[-6000:]))
        assert "EXT4-fs (mmcblk0p2): mounted" in log, log[-6000:]
        assert re.search(r"root file system /dev/mmcblk0p2: (\d+)M before", log), log[-6000:]
        key = re.search(r"OFFGRID API KEY: (og-\S+)", log)
        assert key, log[-6000:]
        # /boot/firmware (mmcblk0p1) was mounted: the key was written there.
        assert "the key is also in offgrid-api-key.txt" in log, log[-6000:]
        assert key.group(1) in run(["mtype", "-i", img_at, "::/offgrid-api-key.txt"]).stdout
        sys.stderr.write("raspi3b: first boot done after %.1f s\n" % (time.monotonic() - started))
    finally:
        stop_qemu(qemu)
