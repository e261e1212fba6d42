"""Where settings come from: command line, environment, ~/.config/nsvpn/config.toml.

Precedence is CLI > NSVPN_* environment > config file > built-in default. Every resolved
value remembers its source so `nsvpn config show` (a later issue) and error messages can say
where a value came from.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib


class ConfigError(Exception):
    """A configuration problem the user must fix; the message is shown as is."""


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "nsvpn" / "config.toml"


@dataclass
class Sourced:
    value: Any
    source: str  # "command line", "NSVPN_VIA", "/path/config.toml", "default"


@dataclass
class FileConfig:
    path: Optional[Path]
    data: Dict[str, Any] = field(default_factory=dict)


def load_file(path: Optional[Path] = None, *, explicit: bool = False) -> FileConfig:
    """Read the TOML config. A missing default file is fine; a missing --config file is not."""
    p = path or default_config_path()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {p} does not exist") from None
        return FileConfig(None)
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    return FileConfig(p, data)


def _as_list(value: Any, where: str) -> List[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{where}: 'via' must be a string or a list of strings")


def resolve_via(cli: List[str], env: Dict[str, str], fc: FileConfig) -> Sourced:
    """The upstream list: --via, else NSVPN_VIA (space or comma separated), else the file."""
    if cli:
        return Sourced(list(cli), "command line")
    ev = env.get("NSVPN_VIA", "").replace(",", " ").split()
    if ev:
        return Sourced(ev, "NSVPN_VIA")
    if fc.path is not None and "via" in fc.data:
        vias = _as_list(fc.data["via"], str(fc.path))
        if vias:
            return Sourced(vias, str(fc.path))
    raise ConfigError(
        "no upstream given: use --via URL, set NSVPN_VIA, or put via = \"ssh://host\" in "
        f"{default_config_path()}"
    )
