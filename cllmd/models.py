"""Named models: each one a directory <state>/models/NAME/ (model file, checkpoints, data store
in its tokenizer's ids, its own train settings), one of them active (its name in
<state>/active-model).

A model is created whole in a temporary directory and renamed into place; a state directory
from before named models migrates to a model named "default" on first start.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable

from cllm.catalogue import FINETUNE, MODEL_SETTINGS, SETTINGS, check_section
from cllm.durable import atomic_write, fsync_dir
from cllmd.paths import Dirs, ModelDir

log = logging.getLogger(__name__)

DEFAULT = "default"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"


class ModelsError(ValueError):
    """A model that cannot be created, used or removed; the message says why."""


class NoSuchModel(ModelsError):
    """No model of that name."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ModelsError(f"bad model name {name!r}: {NAME_RULE}")
    return name


class Models:
    """The named models of one state directory."""

    def __init__(self, dirs: Dirs):
        self.dirs = dirs

    # ---- reading ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        root = self.dirs.models
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if NAME_PATTERN.fullmatch(p.name) and self._has_model(p.name))

    def _has_model(self, name: str) -> bool:
        d = self.dirs.model_dir(name)
        return d.model.is_file() or d.checkpoint.is_file()

    def exists(self, name: str) -> bool:
        return NAME_PATTERN.fullmatch(name) is not None and self._has_model(name)

    def dir(self, name: str) -> ModelDir:
        check_name(name)
        if not self._has_model(name):
            raise NoSuchModel(f"no model named {name!r} (models: {', '.join(self.names()) or 'none'})")
        return self.dirs.model_dir(name)

    def active(self) -> str:
        try:
            name = self.dirs.active_model_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return DEFAULT
        return name if NAME_PATTERN.fullmatch(name) else DEFAULT

    def set_active(self, name: str) -> None:
        self.dir(name)
        atomic_write(self.dirs.active_model_file, name + "\n")

    def info(self, name: str) -> dict:
        """What `cllm models` and `cllm model show` print: read from the newest file's header."""
        from cllmd.modelfile import read_model_file
        from cllmd.tokenizer import tokenizer_from_json
        d = self.dir(name)
        path = d.checkpoint if d.checkpoint.is_file() else d.model
        header, tensors = read_model_file(path, verify=False)
        cfg = header["config"]
        meta = header.get("metadata") or {}
        tok = tokenizer_from_json(header["tokenizer"]) if header.get("tokenizer") else None
        params = sum(int(t.size) for n, t in tensors.items() if not n.startswith("optim."))
        checkpoint = meta.get("checkpoint") or {}
        return {"name": name, "active": name == self.active(), "path": str(d.root), "parameters": params,
                "context": cfg.get("block_size"), "vocab_size": cfg.get("vocab_size"),
                "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size} if tok else None,
                "step": int(checkpoint.get("step", 0)), "tokens_seen": int(checkpoint.get("tokens_seen", 0)),
                "config": cfg, "source": meta.get("imported_from") or meta.get("created_from"),
                "generation_defaults": meta.get("generation_defaults") or {}, **self._settings_info(d)}

    def _settings_info(self, d: ModelDir) -> dict:
        # a bad settings file is said, not a reason to hide the model from the listing
        try:
            return {"settings": self.own_settings(d)}
        except ModelsError as e:
            return {"settings": {}, "settings_error": str(e)}

    def own_settings(self, d: ModelDir) -> dict:
        """The model's own train settings ({"lr": 1e-4, ...}; {} when it has none): they stand
        over the configuration file's for this model. ModelsError naming the file and the key
        when the file is unreadable or a value is out of bounds."""
        try:
            values = json.loads(d.settings.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ModelsError(f"{d.settings}: unreadable: {e}") from None
        if not isinstance(values, dict):
            raise ModelsError(f"{d.settings}: not a JSON object")
        unknown = sorted(set(values) - set(MODEL_SETTINGS))
        if unknown:
            raise ModelsError(f"{d.settings}: {unknown[0]} is not a model's own setting "
                              f"(those are: {', '.join(MODEL_SETTINGS)})")
        problem = check_section("train", values)
        if problem:
            raise ModelsError(f"{d.settings}: {problem}")
        # normalized as the catalogue's kinds give them (JSON has no float 1.0 vs int 1)
        return {k: SETTINGS[f"train.{k}"].kind.value(v, from_text=False) for k, v in values.items()}

    def record_settings(self, name: str, changes: dict) -> dict:
        """Adds `changes` (checked by the caller) to the model's own settings; returns them all."""
        d = self.dir(name)
        values = {**self.own_settings(d), **{k: v for k, v in changes.items() if k in MODEL_SETTINGS}}
        _write_settings(d, values)
        return values

    def list(self) -> list[dict]:
        return [self.info(n) for n in self.names()]

    # ---- changing ----------------------------------------------------------------------------------

    def create(self, name: str, source: str, make_default: Callable[[], object]) -> dict:
        """A new model from a Hugging Face directory, a .cllm file or "default" (make_default()
        returns a fresh Model); built in a temporary directory and renamed into place."""
        check_name(name)
        if self._has_model(name) or self.dirs.model_dir(name).root.exists():
            raise ModelsError(f"a model named {name!r} already exists")
        self.dirs.models.mkdir(parents=True, exist_ok=True)
        tmp = ModelDir(self.dirs.models / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.ensure()
        try:
            self._fill(tmp, source, make_default)
            os.rename(tmp.root, self.dirs.model_dir(name).root)
        except BaseException:
            shutil.rmtree(tmp.root, ignore_errors=True)
            raise
        fsync_dir(self.dirs.models)
        log.info("created model %r from %s", name, source)
        return self.info(name)

    def _fill(self, tmp: ModelDir, source: str, make_default) -> None:
        """A fresh default model keeps the catalogue's defaults (made for training from
        scratch); one made from existing weights gets the fine-tuning defaults as its own."""
        from cllmd.hf import HFError, import_hf
        from cllmd.model import Model
        from cllmd.modelfile import ModelFileError
        from cllmd.tokenizer import TokenizerError
        if source == DEFAULT:
            model = make_default()
            model.metadata["created_from"] = DEFAULT
            model.save(tmp.model)
            return
        _write_settings(tmp, FINETUNE)
        path = Path(source).expanduser()
        try:
            if path.is_dir():
                import_hf(path, tmp.model)
            elif path.is_file():
                model = Model.load(path)  # checks the file whole: checksums, config, tensors
                model.metadata.pop("checkpoint", None)
                model.metadata.setdefault("created_from", str(path.absolute()))
                model.save(tmp.model)
            else:
                raise ModelsError(f"{source}: no such file or directory (give a Hugging Face directory, "
                                  f"a .cllm file or 'default')")
        except (HFError, ModelFileError, TokenizerError) as e:
            raise ModelsError(str(e)) from None

    def remove(self, name: str) -> dict:
        d = self.dir(name)
        if name == self.active():
            raise ModelsError(f"{name!r} is the active model: switch to another one first (cllm model use)")
        # one rename takes it out of the listing, then the files go
        trash = self.dirs.models / f".{name}.removing-{secrets.token_hex(4)}"
        os.rename(d.root, trash)
        fsync_dir(self.dirs.models)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("removed model %r", name)
        return {"name": name, "removed": True}

    def sweep(self) -> None:
        """Remove what a crash left half made or half removed (under the state lock)."""
        if not self.dirs.models.is_dir():
            return
        for p in self.dirs.models.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".removing-" in p.name):
                shutil.rmtree(p, ignore_errors=True)

    def migrate(self) -> bool:
        """Move a state directory of before named models (state/model.cllm, checkpoints/, data/)
        into models/default/. Each move is one rename, so a crash half way is finished by the
        next start. Returns whether anything moved."""
        old, new = self.dirs.legacy_model_dir, self.dirs.model_dir(DEFAULT)
        moves = [(src, dst) for src, dst in ((old.model, new.model), (old.checkpoints, new.checkpoints),
                                             (old.data, new.data)) if src.exists()]
        if not moves:
            return False
        new.root.mkdir(parents=True, exist_ok=True)
        for src, dst in moves:
            if dst.exists() and (dst.is_file() or any(dst.iterdir())):
                raise ModelsError(f"cannot migrate {src} to {dst}: both exist; move one away by hand")
            if dst.is_dir():
                dst.rmdir()
            os.rename(src, dst)
            log.info("migrated %s to %s", src, dst)
        fsync_dir(new.root)
        fsync_dir(self.dirs.state)
        if not self.dirs.active_model_file.exists():
            atomic_write(self.dirs.active_model_file, DEFAULT + "\n")
        return True


def _write_settings(d: ModelDir, values: dict) -> None:
    atomic_write(d.settings, json.dumps(values, indent=2, sort_keys=True) + "\n")


__all__ = ["DEFAULT", "Models", "ModelsError", "NoSuchModel", "check_name"]
