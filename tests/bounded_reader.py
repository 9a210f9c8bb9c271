"""Read files with afm_mlx's readers, each in a forked child bounded in memory and time; print one JSON per file.

Usage: python bounded_reader.py < [[kind, path], ...] (JSON on stdin). kind "pt": open_checkpoint and copy every
tensor, keeping them (as the adapter reader does); "adapter": read_adapter against the 3B base's shapes.
Per file: outcome ("read", "refused": an AFMError, "crashed": any other exception, "killed": a signal, e.g. the
time limit), the message, seconds, and `grew`: the child's peak resident memory above its size when it started.
Linux only (fork, /proc/self). The address-space limit protects the machine; tests judge by `grew`.
"""

import json
import os
import resource
import signal
import sys
import time

ADDRESS_SPACE_HEADROOM = 1 << 30  # what a child may map beyond its start (a reader asking for more gets MemoryError)
SECONDS = 10  # CPU and wall-clock limit per file


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def _read_pt(path: str) -> None:
    from afm_mlx.converters.torch_zip import open_checkpoint

    with open_checkpoint(path) as ckpt:
        kept = [ckpt[name].numpy(copy=True) for name in ckpt]
    del kept


def _read_adapter(path: str) -> None:
    from afm_mlx.converters.adapter_formats import read_adapter
    from afm_mlx.presets import BASE_3B

    read_adapter(path, BASE_3B)


READERS = {"pt": _read_pt, "adapter": _read_adapter}


def _child(kind: str, path: str, out: int) -> None:
    from afm_mlx.errors import AFMError

    limit = _status("VmSize") + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (SECONDS, SECONDS))
    signal.alarm(SECONDS)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS: the peak measured is this read's
    start, began = _status("VmRSS"), time.perf_counter()
    try:
        READERS[kind](path)
        outcome, message = "read", ""
    except AFMError as err:
        outcome, message = "refused", str(err)
    except BaseException as err:  # noqa: BLE001 - reported, the test fails on it
        outcome, message = "crashed", f"{type(err).__name__}: {err}"[:400]
    result = {"outcome": outcome, "message": message, "seconds": time.perf_counter() - began,
              "grew": _status("VmHWM") - start}
    os.write(out, json.dumps(result).encode())


def run_one(kind: str, path: str) -> dict:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            _child(kind, path, write_end)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if data:
        return json.loads(data)
    return {"outcome": "killed", "message": f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else "",
            "seconds": None, "grew": None}


def main() -> None:
    import afm_mlx.converters.adapter_formats  # noqa: F401 - imported once here, not in every child
    import afm_mlx.presets  # noqa: F401

    for kind, path in json.load(sys.stdin):
        print(json.dumps(run_one(kind, path)), flush=True)


if __name__ == "__main__":
    main()
