"""Run one worker command with its output appended to a log file (what the Supervisor starts).

    python -m tests.faults.worker LOG_PATH ARGV...

SIGXFSZ is ignored so that a file-size limit (the disk-full fallback) makes writes fail with
EFBIG, an OSError, instead of killing the process; STREAMFN_FAULT_FSIZE sets that limit.
"""
from __future__ import annotations

import os
import resource
import signal
import sys

if __name__ == "__main__":
    log_path, argv = sys.argv[1], sys.argv[2:]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # kept across exec
    limit = os.environ.get("STREAMFN_FAULT_FSIZE")
    if limit:
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    os.execv(argv[0], argv)
