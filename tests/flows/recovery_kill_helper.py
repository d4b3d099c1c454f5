"""Run in *another* process by tests/flows/test_oneshot_recovery.py: ``prune run`` with every
recovery step slowed down (PRUNING_TEST_STEP_DELAY seconds) so the test can SIGKILL the job
between two trainer checkpoints.

    python tests/flows/recovery_kill_helper.py run CONFIG --output-dir DIR
"""

from __future__ import annotations

import os
import sys
import time


def install_slow_steps() -> None:
    from pruning_core.recovery import RecoveryTrainer

    delay, real = float(os.environ.get("PRUNING_TEST_STEP_DELAY", "0.5")), RecoveryTrainer.train_step

    def slow_step(self):
        time.sleep(delay)
        return real(self)

    RecoveryTrainer.train_step = slow_step


if __name__ == "__main__":
    from flows.runtime import configure_environment

    configure_environment()
    install_slow_steps()
    from flows.cli import main

    raise SystemExit(main(sys.argv[1:]))
