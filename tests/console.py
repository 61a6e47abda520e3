"""What a job's console must not show (docs/console.md): Ray's noise, tracebacks, deprecations, folded lines."""

import re

NOISE = re.compile(r"ERROR|\bE\b|Deprecat|Reporting training result|Progress bars disabled|Traceback")
# Ray's core worker logs this at ERROR for every actor whose constructor arguments are object references and
# that may restart (ray-project/ray#53727): Ray Data's own map actors and Ray Train's PreemptionWatcher pass
# theirs so, and no option of ours changes it. docs/console.md lists it with the reason.
# And Ray's GCS at the driver's exit, when a scoring actor's process is gone before its kill RPC arrives (seen in
# CI on a slower 2-core machine; docs/console.md).
RAY_INTERNAL = re.compile(r"core_worker\.cc:\d+: Actor with class name: '(PreemptionWatcher|MapWorker\(MapBatches"
                          r"\(Predictor\)\))' .* has constructor arguments in the object store and max_restarts > 0"
                          r"|\(gcs_server\) gcs_actor_scheduler\.cc:\d+: Failed to kill actor \w+, return status: "
                          r"Invalid: KillActor RPC failed")
# The host's state, not the job's: Ray's raylet says so every 10 s while the disk is over 95% full. A person should
# see it; the job neither causes nor can silence it (CI's disk is shared with other work).
HOST_WARNING = re.compile(r"\(raylet\) file_system_monitor\.cc:\d+: .* is over \d+% full")


def noise(lines: list[str]) -> list[str]:
    """The lines a person should not see: errors, tracebacks and deprecations, but Ray's own that no option
    changes."""
    return [line for line in lines
            if NOISE.search(line) and not RAY_INTERNAL.search(line) and not HOST_WARNING.search(line)]


def folded_lines(lines: list[str]) -> list[str]:
    """Ray's folding of alike lines (folds side by side print alike rows) and its warnings when K folds start their
    worker groups at once."""
    return [line for line in lines if "repeated" in line or "worker processes have been started" in line
            or "available CPUs" in line]
