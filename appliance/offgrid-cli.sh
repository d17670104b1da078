#!/bin/sh
# `offgrid` on the appliance: as root it runs as the service's user on the
# service's state folder (/var/lib/offgrid: models, keys.json, config.json),
# so `sudo offgrid keys create` makes a key the running server accepts.
export PYTHONPATH=/opt/offgrid/site
if [ "$(id -u)" = 0 ]; then
    exec runuser -u offgrid -- env OFFGRID_HOME=/var/lib/offgrid PYTHONPATH=/opt/offgrid/site \
        python3 /opt/offgrid/offgrid.py "$@"
fi
exec python3 /opt/offgrid/offgrid.py "$@"
