#!/bin/sh
# /usr/bin/walled-garden: the command, run by the interpreter of its private virtualenv
# (/usr/lib/walled-garden; why: the header of .ci/package in the repository). exec keeps the
# process id, so systemd's Type=notify sees the daemon as the unit's main process.
exec /usr/lib/walled-garden/bin/python3 -m enforcer.cli "$@"
