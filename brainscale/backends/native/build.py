"""Build, load and register the native CPU D-RTRL kernel (``drtrl.cc``, XLA FFI).

The kernel is compiled on first use with the machine's C++ compiler (``$CXX``, else
``c++`` / ``g++`` / ``clang++`` on the path) against the XLA FFI headers that ship with
jaxlib (``jax.ffi.include_dir()``), with ``-O3 -march=native``. The shared library is
cached under ``$BRAINSCALE_NATIVE_CACHE`` (default ``$XDG_CACHE_HOME/brainscale/native``,
i.e. ``~/.cache/brainscale/native``), in a file named by a hash of the source, the jaxlib
version, the compiler and the CPU, so a new jaxlib, compiler or machine builds it again.
Concurrent first uses (test workers) each build to a temporary file and rename it into
place. No compiler: :class:`NativeUnavailable`, which says what to install, and
:func:`available` is False (``backend='native'`` then refuses to compile).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform as _platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from ...errors import BrainscaleError

__all__ = ["NativeUnavailable", "library", "register", "available", "why_unavailable",
           "SOURCE", "TARGETS"]

SOURCE = Path(__file__).with_name("drtrl.cc")
#: FFI target name -> exported handler symbol
TARGETS = {"brainscale_drtrl_step": "BrainscaleDrtrlStep",
           "brainscale_drtrl_update": "BrainscaleDrtrlUpdate",
           "brainscale_drtrl_grad": "BrainscaleDrtrlGrad",
           "brainscale_drtrl_decay_add": "BrainscaleDrtrlDecayAdd",
           "brainscale_outer_acc": "BrainscaleOuterAcc",
           "brainscale_outer_acc_multi": "BrainscaleOuterAccMulti"}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w") + (
    ("-mprefer-vector-width=512",) if _platform.machine() in ("x86_64", "AMD64") else ())


class NativeUnavailable(BrainscaleError):
    """The native CPU kernel cannot be built or loaded here."""


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or None
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return _platform.processor() or _platform.machine()


def _cache_dir() -> Path:
    env = os.environ.get("BRAINSCALE_NATIVE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "brainscale" / "native"


@functools.lru_cache(maxsize=None)
def library() -> Path:
    """The compiled shared library (built now if not cached)."""
    import jax
    import jaxlib
    cxx = _compiler()
    if cxx is None:
        raise NativeUnavailable(
            "the native CPU D-RTRL kernel is compiled on first use, but no C++ compiler was "
            "found (looked for $CXX, c++, g++, clang++): install one (e.g. `apt install g++`) "
            "or compile with backend='jax'")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"the C++ compiler {cxx} does not run ({e}); set $CXX to a "
                                f"working one or compile with backend='jax'") from e
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, jaxlib.__version__.encode(), cxx.encode(),
                                     "".join(version).encode(), " ".join(FLAGS).encode(),
                                     _cpu_id().encode(), _platform.machine().encode()]))
    name = f"drtrl-{key.hexdigest()[:16]}.so"
    for d in (_cache_dir(), Path(tempfile.gettempdir()) / f"brainscale-native-{os.getuid()}"):
        out = d / name
        if out.exists():
            return out
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=d)
            os.close(fd)
        except OSError:
            continue
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            os.unlink(tmp)
            raise NativeUnavailable(f"building the native kernel failed: {e}") from e
        if res.returncode != 0:
            os.unlink(tmp)
            raise NativeUnavailable(
                f"building the native CPU D-RTRL kernel failed ({' '.join(cmd)}):\n"
                f"{res.stderr[-3000:]}\nCompile with backend='jax' instead, or set $CXX to a "
                f"C++17 compiler")
        os.replace(tmp, out)
        return out
    raise NativeUnavailable(
        f"no writable cache directory for the native kernel (tried {_cache_dir()} and the "
        f"temporary directory): set $BRAINSCALE_NATIVE_CACHE")


@functools.lru_cache(maxsize=None)
def register() -> ctypes.CDLL:
    """Build (if needed), load the library and register its FFI targets with XLA (once)."""
    import jax
    lib = ctypes.CDLL(str(library()))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return lib


@functools.lru_cache(maxsize=None)
def why_unavailable() -> str | None:
    """None when the kernel can run on this machine's default JAX device, else why not."""
    import jax
    if jax.default_backend() != "cpu":
        return (f"the native kernel runs on the CPU, the default JAX device is "
                f"{jax.default_backend()!r}")
    try:
        register()
    except NativeUnavailable as e:
        return str(e)
    return None


def available() -> bool:
    return why_unavailable() is None
