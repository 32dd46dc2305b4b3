"""The model repository on disk: what each folder of ``--model-repository`` asks to serve.

Layout (Triton's, with TOML in place of config.pbtxt)::

    <repo>/<model>/config.toml       the keys of a [models.NAME] table, plus the version policy
    <repo>/<model>/labels.txt        optional: the model's labels when config.toml names none
    <repo>/<model>/<version>/...     numeric folders holding the files of each version

Paths in ``config.toml`` are relative to the **model folder** (``weights = "1/model.pt"``).
Files config.toml does not name are taken from each version folder: ``model.onnx`` (onnx:
``path``), ``deploy.prototxt`` (caffe: ``prototxt``), ``model.caffemodel`` / ``model.safetensors``
/ ``model.pt`` / ``model.pth`` (``weights``). A model without version folders (an LRN op, a
built-in network with random weights) is version 1. Version policy (Triton's):
``version_policy = "latest"`` with ``latest = N`` (default 1), ``"all"``, or ``"specific"`` with
``specific = [1, 3]``. A version folder may hold its own ``config.toml`` whose keys override the
model's for that version (``k = 2.0``). Reading judges everything (a ``ConfigError`` naming the file and key), so
a broken folder never replaces a working model. Pure: no server state.
"""

from __future__ import annotations

import hashlib
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .schema import ConfigError
from .settings import MODEL_GROUPS, ModelConfig, model_from_table

CONFIG_FILE = "config.toml"
LABELS_FILE = "labels.txt"
POLICY_KEYS = ("version_policy", "latest", "specific")
# The file each kind's required or optional key is filled in from, found in a version folder.
FILLED = {
    "onnx": (("path", ("model.onnx",)),),
    "caffe": (("prototxt", ("deploy.prototxt",)), ("weights", ("model.caffemodel",))),
}
WEIGHT_FILES = ("model.caffemodel", "model.safetensors", "model.pt", "model.pth")


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a folder's versions are served (Triton's ModelVersionPolicy); ModelConfig reports it."""

    kind: str = "latest"  # latest | all | specific
    latest: int = 1  # kind latest: how many of the newest
    specific: tuple[int, ...] = ()  # kind specific: the versions, ascending


LATEST_ONE = VersionPolicy()  # Triton's default, and a configured model's


@dataclass(frozen=True)
class Plan:
    """What one model folder serves: a config per selected version, a fingerprint of each
    version's files (a change means reload), and the policy that selected the versions."""

    name: str
    configs: Mapping[str, ModelConfig]
    fingerprints: Mapping[str, str]
    policy: VersionPolicy = LATEST_ONE


def model_folders(root: Path) -> dict[str, Path]:
    """The model folders of a repository, by model name (hidden folders skipped)."""
    if not root.is_dir():
        raise ConfigError(f"model_repository: folder {root} does not exist")
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def read_model(name: str, folder: Path, override: Mapping[str, Any] | None = None) -> Plan:
    """The plan of ``folder``; ``override`` (RepositoryModelLoad's ``config``) replaces config.toml."""
    where = f"{folder / CONFIG_FILE}"
    if override is not None:
        table, where = dict(override), f"model '{name}' (load config)"
    elif (folder / CONFIG_FILE).is_file():
        try:
            table = tomllib.loads((folder / CONFIG_FILE).read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: invalid TOML: {exc}") from None
    else:
        table = {}
    policy = version_policy(where, {key: table.pop(key) for key in POLICY_KEYS if key in table})
    available = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    versions = _select(where, policy, available or [1])
    kind = str(table.get("kind", name))
    if "labels" not in table and (folder / LABELS_FILE).is_file() and kind in MODEL_GROUPS["network"]:
        table["labels"] = LABELS_FILE
    configs, fingerprints = {}, {}
    for version in versions:
        version_dir = folder / str(version)
        filled = {**table, **_version_table(version_dir)}
        for key, candidates in FILLED.get(kind, ()):
            _fill(filled, key, version_dir, candidates)
        if kind in MODEL_GROUPS["weighted"] and kind != "caffe":
            _fill(filled, "weights", version_dir, WEIGHT_FILES)
        try:
            configs[str(version)] = model_from_table(name, filled, folder)
        except ConfigError as exc:
            raise ConfigError(f"{where} (version {version}): {exc}") from None
        fingerprints[str(version)] = _fingerprint(folder, version_dir, override)
    return Plan(name, configs, fingerprints, policy)


def version_policy(where: str, keys: Mapping[str, Any]) -> VersionPolicy:
    """The policy config.toml's ``version_policy``/``latest``/``specific`` keys describe."""
    kind = keys.get("version_policy", "latest")
    if kind == "latest":
        latest = keys.get("latest", 1)
        if isinstance(latest, bool) or not isinstance(latest, int) or latest < 1:
            raise ConfigError(f"{where}: latest: expected an integer >= 1, got {latest!r}")
        return VersionPolicy("latest", latest=latest)
    if kind == "all":
        return VersionPolicy("all")
    if kind == "specific":
        wanted = keys.get("specific")
        if not isinstance(wanted, list) or not wanted or not all(_is_version(v) for v in wanted):
            raise ConfigError(f"{where}: specific: expected a non-empty list of version numbers, got {wanted!r}")
        return VersionPolicy("specific", specific=tuple(sorted(set(wanted))))
    raise ConfigError(f"{where}: version_policy: expected latest, all or specific, got {kind!r}")


def _is_version(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def select_versions(where: str, keys: Mapping[str, Any], available: list[int]) -> list[int]:
    """The versions the policy ``keys`` select of those on disk (newest last)."""
    return _select(where, version_policy(where, keys), available)


def _select(where: str, policy: VersionPolicy, available: list[int]) -> list[int]:
    if policy.kind == "latest":
        return available[-policy.latest :]
    if policy.kind == "all":
        return available
    missing = sorted(set(policy.specific) - set(available))
    if missing:
        raise ConfigError(f"{where}: specific: no version folder {missing}; folders: {available}")
    return list(policy.specific)


def _version_table(version_dir: Path) -> dict[str, Any]:
    """A version folder's own config.toml: keys that differ from the model's (e.g. an LRN's k)."""
    path = version_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    bad = sorted(set(table) & set(POLICY_KEYS))
    if bad:
        raise ConfigError(f"{path}: {bad[0]}: the version policy belongs in the model's config.toml")
    return table


def _fill(table: dict[str, Any], key: str, version_dir: Path, candidates: tuple[str, ...]) -> None:
    if key in table:
        return
    for candidate in candidates:
        if (version_dir / candidate).is_file():
            table[key] = str(version_dir / candidate)
            return


def _fingerprint(folder: Path, version_dir: Path, override: Mapping[str, Any] | None) -> str:
    """A digest of what a version is made of: config.toml, labels, the version folder's files."""
    digest = hashlib.sha256(repr(sorted((override or {}).items())).encode())
    files = [folder / CONFIG_FILE, folder / LABELS_FILE]
    if version_dir.is_dir():
        files += sorted(p for p in version_dir.rglob("*") if p.is_file())
    for path in files:
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def write_files(name: str, files: Mapping[str, bytes]) -> Path:
    """A temporary model folder holding ``files`` (RepositoryModelLoad's ``file:<version>/<name>``
    parameters, keys without the ``file:`` prefix); the caller removes it."""
    folder = Path(tempfile.mkdtemp(prefix=f"lrnserve-{name}-"))
    for relative, content in files.items():
        path = PurePosixPath(relative)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ConfigError(f"file:{relative}: expected a path inside the model folder, like 1/model.onnx")
        target = folder.joinpath(*path.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return folder
