"""Where cllmd keeps its state, sockets, cache and configuration.

Resolution order: explicit flag > systemd's *_DIRECTORY variables > XDG base directories (the
rules themselves live in cllm.layout, shared with the clients).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cllm import layout

log = logging.getLogger(__name__)

APP = layout.APP
CONFIG_NAME = "cllmd.toml"
SYSTEM_CONFIG = Path("/etc/cllmd") / CONFIG_NAME
# State and runtime hold the model, the queue and the sockets: group-readable only, because the
# runtime directory's permissions are the access control of the IPC sockets (DESIGN.md), and the
# queue's group drops files into <state>/queue/incoming/.
DIR_MODE = 0o750
# What only the daemon reads: the data store (the users' documents, tokenized) and checkpoints.
PRIVATE_DIR_MODE = 0o700


class PathsError(Exception):
    """A directory cannot be used (wrong owner, not a directory, cannot be created)."""


def _flag(value: str | os.PathLike[str] | None) -> Path | None:
    if value is None or str(value) == "":
        return None
    return Path(value).expanduser().absolute()


@dataclass(frozen=True)
class Dirs:
    """The daemon's directories; every other path is derived from these four."""

    state: Path
    runtime: Path
    cache: Path
    config_file: Path | None

    @classmethod
    def resolve(
        cls,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        runtime_dir: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        config: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        system_config: Path = SYSTEM_CONFIG,
    ) -> "Dirs":
        """Apply the resolution order; `env` defaults to os.environ (tests pass their own)."""
        env = os.environ if env is None else env
        state = _flag(state_dir) or layout.state_dir(env)
        # ensure() refuses the /tmp fallback of runtime_dir() if someone else created it first.
        runtime = _flag(runtime_dir) or layout.runtime_dir(env)
        cache = _flag(cache_dir) or layout.cache_dir(env)
        config_file = _flag(config)
        if config_file is None:
            conf_dir = layout.configuration_dir(env)
            if conf_dir is not None and (conf_dir / CONFIG_NAME).is_file():
                config_file = conf_dir / CONFIG_NAME
            elif system_config.is_file():
                config_file = system_config
        return cls(state=state, runtime=runtime, cache=cache, config_file=config_file)

    # Derived paths: the one place their layout is written down.
    @property
    def socket(self) -> Path:
        return self.runtime / layout.SOCKET_NAME

    @property
    def events_socket(self) -> Path:
        return self.runtime / layout.EVENTS_SOCKET_NAME

    @property
    def queue(self) -> Path:
        return self.state / layout.QUEUE_DIR

    @property
    def models(self) -> Path:
        """The named models, one directory each (see model_dir)."""
        return self.state / "models"

    @property
    def active_model_file(self) -> Path:
        """Holds the active model's name."""
        return self.state / "active-model"

    def model_dir(self, name: str) -> "ModelDir":
        return ModelDir(self.models / name)

    @property
    def legacy_model_dir(self) -> "ModelDir":
        """Where a state directory from before named models kept its one model."""
        return ModelDir(self.state)

    @property
    def lock(self) -> Path:
        return self.state / "cllmd.lock"

    @property
    def furniture(self) -> Path:
        """The memory of lines repeated across a site's pages (preprocess.RepeatedLines)."""
        return self.state / "furniture.msgpack"

    @property
    def socket_endpoint(self) -> str:
        return f"ipc://{self.socket}"

    @property
    def events_endpoint(self) -> str:
        return f"ipc://{self.events_socket}"

    def ensure(self) -> None:
        """Create state, runtime, cache and queue (mode 0750) and models/ (0700; each model's
        directory: ModelDir.ensure); directories that exist with a looser mode are tightened."""
        for d in (self.state, self.cache):
            _make_dir(d, DIR_MODE)
        # Checked before any tightening: a runtime directory that others could write to may
        # hold what they planted there.
        public_parent = self.runtime.parent.is_dir() and \
            os.stat(self.runtime.parent).st_mode & stat.S_IWOTH
        if public_parent and self.runtime.is_dir():
            _check_private(self.runtime)
        _make_dir(self.runtime, DIR_MODE)
        if public_parent:
            _check_private(self.runtime)
        _make_dir(self.queue, DIR_MODE)
        _make_dir(self.models, PRIVATE_DIR_MODE)


@dataclass(frozen=True)
class ModelDir:
    """One named model's directory: its model file, its checkpoints and the data store in its
    tokenizer's ids."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model.cllm"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def checkpoint(self) -> Path:
        return self.checkpoints / "latest.cllm"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def settings(self) -> Path:
        """The model's own train settings (cllm.catalogue.MODEL_SETTINGS), JSON."""
        return self.root / "settings.json"

    def ensure(self) -> None:
        """Only the daemon reads a model's files (mode 0700; looser existing ones tightened)."""
        for d in (self.root, self.checkpoints, self.data):
            _make_dir(d, PRIVATE_DIR_MODE)


def _make_dir(path: Path, mode: int) -> None:
    try:
        if path.is_dir():
            _tighten(path, mode)
            return
        # Parents follow the XDG spec (0700); the leaf gets `mode` regardless of the umask.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.mkdir(mode=mode)
        os.chmod(path, mode)
        log.info("created %s", path)
    except FileExistsError:
        if not path.is_dir():
            raise PathsError(f"{path}: exists and is not a directory") from None
    except OSError as e:
        raise PathsError(f"{path}: cannot create directory: {e.strerror}") from e


def _tighten(path: Path, mode: int) -> None:
    # Only ever removes permissions (an administrator's tighter mode stays), and only on a
    # directory of ours: a shared parent someone else owns is left alone.
    st = os.stat(path)
    current = stat.S_IMODE(st.st_mode)
    if current & ~mode and st.st_uid == os.getuid():
        os.chmod(path, current & mode)
        log.info("%s: mode %03o tightened to %03o", path, current, current & mode)


def _check_private(path: Path) -> None:
    # In a world-writable parent (/tmp, the fallback) the directory may have been planted by
    # another user to catch our sockets: it must be ours and writable by nobody else.
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PathsError(f"{path}: is not a directory")
    if st.st_uid != os.getuid():
        raise PathsError(f"{path}: owned by uid {st.st_uid}, not by us (uid {os.getuid()})")
    if st.st_mode & 0o022:
        raise PathsError(f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")
