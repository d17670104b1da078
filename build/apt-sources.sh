# shellcheck shell=bash
# The host's Debian apt sources for one suite (and its -updates and
# -security), as sources.list lines with the given components, so that no
# mirror is named in the project; OFFGRID_APT_SOURCES (a sources.list file)
# takes their place.
#
#   host_apt_sources SUITE "COMPONENTS" WHO     (WHO names the caller in errors)
host_apt_sources() {
    if [ -n "${OFFGRID_APT_SOURCES:-}" ]; then cat "$OFFGRID_APT_SOURCES"; return; fi
    python3 - "$1" "$2" "$3" <<'PY'
import glob, re, sys
suite, components, who = sys.argv[1], sys.argv[2], sys.argv[3]
ours = {suite, suite + "-updates", suite + "-security"}
out = []
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        f = line.split("#")[0].split()
        if len(f) >= 4 and f[0] == "deb":
            i = next(k for k, x in enumerate(f) if x.endswith("]")) + 2 if f[1].startswith("[") else 2
            if f[i] in ours:
                out.append("deb %s %s %s" % (f[i - 1], f[i], components))
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = {}
        for line in stanza.splitlines():
            m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
            if m and not line.startswith("#"):
                fields[m.group(1).lower()] = m.group(2).split()
        if "deb" not in fields.get("types", []) or fields.get("enabled", ["yes"])[0] == "no":
            continue
        for s in fields.get("suites", []):
            if s in ours:
                for uri in fields.get("uris", []):
                    out.append("deb %s %s %s" % (uri, s, components))
if not out:
    sys.exit("%s: the host's apt sources name no %s suite; set OFFGRID_APT_SOURCES to a sources.list "
             "for Debian %s" % (who, suite, suite))
print("\n".join(dict.fromkeys(out)))
PY
}
