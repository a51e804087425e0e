"""Imported by every Celery worker that `gtex-assets cluster up` starts (its ``-I`` list).

Celery's prefork pool marks its processes daemonic, and Python forbids daemonic processes to
start children, and its processes' authkey (billiard's) refuses to be pickled into a spawned
child; but steps parallelise inside themselves (tiling and filtering use a spawn process pool
over the slides of a batch). Each pool process becomes a plain process for that purpose: it
waits for its own children, and the worker restarts a pool process that dies.
"""

import multiprocessing
import multiprocessing.process
import os

from celery.signals import worker_process_init


@worker_process_init.connect
def _allow_child_processes(**_kwargs) -> None:
    config = multiprocessing.current_process()._config  # noqa: SLF001
    config["daemon"] = False
    config["authkey"] = multiprocessing.process.AuthenticationString(os.urandom(32))
