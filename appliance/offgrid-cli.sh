#!/bin/sh
# `offgrid` on the appliance: as root it runs as the service's user on the
# service's state folder (/var/lib/offgrid: models, keys.json, config.json),
# so `sudo offgrid keys create` makes a key the running server accepts.
# Imported from /opt/offgrid rather than run as a script, so it starts from
# the bytecode compiled there instead of compiling offgrid.py every time.
export PYTHONPATH=/opt/offgrid/site
start='import sys; sys.path[0] = "/opt/offgrid"; import offgrid; sys.exit(offgrid.main())'
if [ "$(id -u)" = 0 ]; then
    exec runuser -u offgrid -- env OFFGRID_HOME=/var/lib/offgrid PYTHONPATH=/opt/offgrid/site \
        python3 -c "$start" "$@"
fi
exec python3 -c "$start" "$@"
