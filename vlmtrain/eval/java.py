"""Check that a usable Java runtime is on PATH before the Java-based caption metrics start."""

from __future__ import annotations

import re
import shutil
import subprocess

_INSTALL_HINT = (
    "Install a Java runtime (8 or newer) and make sure `java -version` works in this shell, e.g.\n"
    "  Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless\n"
    "  conda:         conda install -c conda-forge openjdk\n"
    "  macOS:         brew install openjdk"
)
_WHY = "pycocoevalcap's PTBTokenizer and METEOR (and SPICE, when requested) are Java programs"
_VERSION_RE = re.compile(r'version "([^"]+)"')


class JavaNotFoundError(RuntimeError):
    """No usable `java` executable: missing from PATH, failing to run, or older than required."""


def java_major_version(version: str) -> int:
    """Major release of a `java -version` string: "1.8.0_292" -> 8, "17.0.15" -> 17, "21-ea" -> 21."""
    parts = re.split(r"[._\-+]", version)
    if not parts[0].isdigit():
        raise ValueError(f"cannot parse the Java version {version!r}")
    # Java 8 and older report themselves as 1.x.
    if parts[0] == "1" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1])
    return int(parts[0])


def require_java(min_major: int = 8, timeout_s: float = 60.0) -> str:
    """Run `java -version` and return the version string (e.g. "17.0.15"); raise JavaNotFoundError if unusable."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(f"`java` was not found on PATH; {_WHY}.\n{_INSTALL_HINT}")
    try:
        proc = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise JavaNotFoundError(f"`{java} -version` could not run ({exc}); {_WHY}.\n{_INSTALL_HINT}") from exc
    # `java -version` prints to stderr by specification; some wrappers use stdout.
    output = (proc.stderr + proc.stdout).strip()
    if proc.returncode != 0:
        raise JavaNotFoundError(
            f"`{java} -version` exited with status {proc.returncode}: {output[-500:]!r}; {_WHY}.\n{_INSTALL_HINT}"
        )
    match = _VERSION_RE.search(output)
    if match is None:
        raise JavaNotFoundError(f"`{java} -version` printed no version: {output[-500:]!r}.\n{_INSTALL_HINT}")
    version = match.group(1)
    if java_major_version(version) < min_major:
        raise JavaNotFoundError(
            f"`{java}` is Java {version}, but Java {min_major}+ is needed; {_WHY}.\n{_INSTALL_HINT}"
        )
    return version
