"""Read a JSON file a user hands over (config.json, tokenizer_config.json, adapter_config.json, metadata.json,
bench prompts) so that every way it can be wrong is one AFMError naming the file.

Python's json module otherwise raises OSError, UnicodeDecodeError, JSONDecodeError, RecursionError (deep
nesting) or ValueError (an integer of more than 4,300 digits), and accepts NaN and Infinity, which are not JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import AFMError

MAX_JSON_BYTES = 64 << 20  # these files are kilobytes; a bigger one is not what it claims to be


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_json(path: str | Path) -> Any:
    """The parsed contents of `path`; AFMError (with the path) for anything unreadable or not strict JSON."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as err:
        raise AFMError(f"{path}: cannot read ({err.strerror or err})") from None
    if len(data) > MAX_JSON_BYTES:
        raise AFMError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB; not a configuration file")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError as err:
        raise AFMError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise AFMError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    except RecursionError:
        raise AFMError(f"{path}: JSON nested too deeply") from None
    except ValueError as err:  # NaN / Infinity, or an integer too long to convert
        raise AFMError(f"{path}: invalid JSON ({str(err).splitlines()[0][:100]})") from None


def require(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """obj[key] when obj is a dict holding a value of `kind` there (bool is not an int); else AFMError."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        names = " or ".join(k.__name__ for k in _as_tuple(kind))
        raise AFMError(f"{where}: `{key}` must be {names}, got {repr(value)[:40]}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
