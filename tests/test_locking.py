"""The output-folder lock refuses a second run and frees itself when its holder dies."""

import subprocess
import sys
import time

import pytest

from datadream_hf.run_folder import OutputDirLock, OutputDirLockedError


def test_second_run_is_refused_until_the_first_releases(tmp_path):
    with OutputDirLock(tmp_path):
        with pytest.raises(OutputDirLockedError, match=r"in use by another run \(pid \d+\).*another --output_dir"):
            OutputDirLock(tmp_path).acquire()
    with OutputDirLock(tmp_path):  # free again
        pass


def test_lock_of_a_killed_process_is_released(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from datadream_hf.run_folder import OutputDirLock; "
            f"lock = OutputDirLock({str(tmp_path)!r}); lock.acquire(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputDirLockedError, match=str(holder.pid)):
        OutputDirLock(tmp_path).acquire()
    holder.kill()  # SIGKILL: no cleanup code runs
    holder.wait()
    deadline = time.time() + 10
    while True:
        try:
            OutputDirLock(tmp_path).acquire()
            break
        except OutputDirLockedError:
            assert time.time() < deadline
            time.sleep(0.1)
