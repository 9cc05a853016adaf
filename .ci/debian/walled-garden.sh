#!/bin/sh
# /usr/bin/walled-garden: the command, run by the interpreter of its private virtualenv
# (/usr/lib/walled-garden; why: the header of .ci/package in the repository). exec keeps the
# process id, so systemd's Type=notify sees the daemon as the unit's main process. -I (isolated):
# neither the current directory nor PYTHON* variables reach the module path, so root running the
# command in a directory others can write (billing's drop directory, /tmp) imports nothing from it.
exec /usr/lib/walled-garden/bin/python3 -I -m enforcer.cli "$@"
