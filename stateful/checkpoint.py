"""Checkpoints of lane state on any fsspec URL, published by a manifest written last.

Layout under the checkpoint URL, per lane (source and partition):

    <source>/<partition>/state/<checkpoint id>-<stage>-<n>.arrow    Arrow IPC (lz4) frames
    <source>/<partition>/manifests/<sequence>.json                  what a restore needs

A source whose lanes feed a re-keyed stage (streamfn.stateful.exchange) checkpoints its lanes
together: one manifest under `<source>/%23keyed/` holds every lane's position and every
key-lane's state, written while no batch is in flight.

Manifests are numbered per lane (000000000000.json, 000000000001.json, ...): a process that
takes a partition over continues the numbering of the checkpoint it restored, and publishes
each number exclusively (a hard link on local disk, `If-None-Match: *` on S3), so a worker
that lost its partition but still runs cannot overwrite the new owner's checkpoints.

A manifest records the source position, each stage's snapshot (frames replaced by file
references with their SHA-256), and the pipeline's state code hash. It is written after
every state file and atomically (rename on local disk, a single PUT on object stores), so a
crash leaves either the old checkpoint or the new one. The last `keep` manifests are kept;
state files no kept manifest names are deleted.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import fsspec
import polars as pl
from fsspec.implementations.local import LocalFileSystem

from streamfn.batch import Position
from streamfn.errors import ConfigError, StreamfnError
from streamfn.retry import Retry
from streamfn.runtime import UNBOUNDED
from streamfn.stateful import keygroup
from streamfn.stateful.codehash import state_code_hash

if TYPE_CHECKING:
    from streamfn.lane import Lane
    from streamfn.runtime import Runtime

log = logging.getLogger("streamfn.stateful.checkpoint")

FRAME_REF = "__frame__"
FORMAT_VERSION = 1
# A store that is away for a moment (a full disk freed, S3 unreachable) costs a wait; a longer
# outage fails the lane with one line, and the supervisor's restart resumes from the last manifest.
_WRITE = Retry("checkpoint write", attempts=5, base_s=0.2, max_s=5.0)


class StateMismatch(ConfigError):
    """The saved state was written by different stateful code; restoring it would load garbage."""


class LaneTakenOver(StreamfnError):
    """Another process published a checkpoint of this lane: this one no longer owns it."""


class CorruptCheckpoint(Exception):
    """A manifest or state file is unreadable or fails its checksum (the previous one is used)."""


class Checkpointer:
    """Saves and restores the state of a run's lanes under one URL."""

    def __init__(self, url: str, *, pipeline: str, code_hash: str, keep: int = 3, reset: bool = False,
                 storage_options: dict[str, Any] | None = None) -> None:
        if keep < 1:
            raise ConfigError(f"checkpoint.keep must be at least 1, got {keep}")
        self.url, self.pipeline, self.code_hash, self.keep, self.reset = url, pipeline, code_hash, keep, reset
        self.fs, self.root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self._loaded: dict[tuple[str, str], tuple[dict[str, Any], dict[str, pl.DataFrame]] | None] = {}
        self._reset_done: set[tuple[str, str]] = set()
        self._next_seq: dict[tuple[str, str], int] = {}
        self._last_saved: dict[tuple[str, str], tuple[str, Any]] = {}  # (files, position) per lane
        self.runtime: Runtime | None = None  # set for a run: re-keyed sources checkpoint as a group

    @classmethod
    def for_runtime(cls, runtime: "Runtime") -> "Checkpointer":
        """The checkpointer a run uses: `checkpoint` setting, else the pipeline's, else the run dir."""
        settings = runtime.settings
        url = settings.get("checkpoint") or runtime.pipeline.checkpoint or os.path.join(
            runtime.pipeline.run_dir, "checkpoints")
        storage = {k[len("checkpoint.storage."):]: v for k, v in settings.items()
                   if k.startswith("checkpoint.storage.")}
        keep = int(settings.get("checkpoint.keep", "3"))
        reset = settings.get("state.reset", "") in ("1", "true", "yes")
        checkpointer = cls(url, pipeline=runtime.pipeline.name, code_hash=state_code_hash(runtime.order),
                           keep=keep, reset=reset, storage_options=storage)
        checkpointer.runtime = runtime
        keygroup.check_declared_keys(runtime)  # before any source starts
        log.info("checkpoints", extra={"url": url, "keep": keep, "reset": reset,
                                       "code_hash": checkpointer.code_hash})
        return checkpointer

    # -- paths --------------------------------------------------------------------------------
    def lane_dir(self, source: str, partition: str) -> str:
        """Where one lane's checkpoints live (partition names are quoted; long ones hashed)."""
        part = quote(partition, safe="")
        if len(part) > 100:
            part = part[:60] + "-" + hashlib.sha1(partition.encode()).hexdigest()[:16]
        return f"{self.root.rstrip('/')}/{quote(source, safe='')}/{part}"

    # -- the runtime's calls ----------------------------------------------------------------
    def resume_position(self, source: str, partition: str, bound: Any = UNBOUNDED) -> Position:
        """Where the lane should start reading: the position of the latest good checkpoint (with a
        bound: the latest at or before it; None: none, as no transaction of the lane committed)."""
        if self.runtime is not None and keygroup.group_mode(self.runtime, source):
            return keygroup.KeyGroup.for_source(self.runtime, source).resume_position(partition)
        loaded = self._load(source, partition, bound)
        return None if loaded is None else loaded[0]["position"]

    def restore_lane(self, lane: "Lane") -> None:
        """Load every stage's state of this lane from the latest good checkpoint."""
        group = getattr(lane, "group", None)
        if group is not None:  # re-keyed: the key-lanes were restored with the group
            group.restore_lane(lane)
            return
        key = (lane.source.name, lane.partition)
        loaded = self._load(*key)
        self._loaded.pop(key, None)
        if loaded is None:
            return
        manifest, frames = loaded
        if manifest["position"] != lane.position:
            log.warning("the lane was opened at another position than its checkpoint's; state and "
                        "input may disagree", extra={"lane": lane.id, "offset": lane.position,
                                                      "checkpoint_offset": manifest["position"]})
        for name, saved in manifest["stages"].items():
            runner = lane.runners.get(name)
            if runner is None:
                raise StateMismatch(f"checkpoint {manifest['checkpoint_id']} of lane {lane.id} holds state of "
                                    f"stage {name!r}, which this pipeline lacks; run with --reset-state "
                                    "to start over")
            runner.restore(_substitute(saved, frames))
        log.info("state restored", extra={"lane": lane.id, "checkpoint": manifest["checkpoint_id"],
                                          "offset": manifest["position"]})

    def save_lane(self, lane: "Lane", checkpoint_id: str) -> None:
        """Write each stage's snapshot, then publish the manifest, then drop old checkpoints."""
        started = time.perf_counter()
        base = self.lane_dir(lane.source.name, lane.partition)
        self._reset_if_asked(lane.source.name, lane.partition)
        stages: dict[str, Any] = {}
        files: dict[str, dict[str, Any]] = {}
        for name, runner in lane.runners.items():
            snap = runner.snapshot(checkpoint_id)
            if snap is not None:
                stages[name] = self._write_frames(snap, base, f"{checkpoint_id}-{quote(name, safe='')}", files)
        self._publish_manifest((lane.source.name, lane.partition), base, checkpoint_id, lane.position,
                               {"stages": stages}, files, started)

    def save_group(self, group: "keygroup.KeyGroup", checkpoint_id: str) -> None:
        """Write a key group's state (every key-lane, every lane's own), then its one manifest."""
        started = time.perf_counter()
        partition = keygroup.GROUP_PARTITION
        base = self.lane_dir(group.source, partition)
        self._reset_if_asked(group.source, partition)
        files: dict[str, dict[str, Any]] = {}
        body = group.snapshot(checkpoint_id)
        stages = self._write_frames(body["stages"], base, f"{checkpoint_id}-keyed", files)
        lanes = self._write_frames(body["lanes"], base, f"{checkpoint_id}-lanes", files)
        self._publish_manifest((group.source, partition), base, checkpoint_id, body["position"],
                               {"stages": stages, "lanes": lanes, "key_lanes": body["key_lanes"]}, files, started)

    def load_group(self, source: str) -> dict[str, Any] | None:
        """The latest good checkpoint of a key group, its frames loaded (None: there is none)."""
        key = (source, keygroup.GROUP_PARTITION)
        loaded = self._load(*key)
        self._loaded.pop(key, None)
        if loaded is None:
            if not self.reset and self._lane_checkpoints_exist(source):
                raise StateMismatch(f"source {source!r}: the checkpoint at {self.url} holds state per lane, "
                                    "but this run re-keys it across lanes (the source now has several "
                                    "partitions); run with --reset-state to start over")
            return None
        manifest, frames = loaded
        log.info("key group restored", extra={"source": source, "checkpoint": manifest["checkpoint_id"],
                                               "key_lanes": manifest.get("key_lanes")})
        return _substitute(manifest, frames)  # type: ignore[no-any-return]

    def _lane_checkpoints_exist(self, source: str) -> bool:
        root = f"{self.root.rstrip('/')}/{quote(source, safe='')}"
        try:
            names = self.fs.ls(root, detail=False)
        except FileNotFoundError:
            return False
        group = quote(keygroup.GROUP_PARTITION, safe="")
        return any(os.path.basename(n.rstrip("/")) != group for n in names)

    def _publish_manifest(self, key: tuple[str, str], base: str, checkpoint_id: str, position: Any,
                          body: dict[str, Any], files: dict[str, dict[str, Any]], started: float) -> None:
        """Publish the next manifest of a lane (or key group), unless nothing changed; drop old ones."""
        lane_id = f"{key[0]}[{key[1]}]"
        if self._last_saved.get(key) == (json.dumps(files, sort_keys=True), position):
            return  # an idle lane: same position, same state files, nothing to publish
        seq = self._next_seq.get(key)
        if seq is None:
            seq = self._seq_after(self._manifests(base))
        manifest = {
            "format": FORMAT_VERSION, "seq": seq, "checkpoint_id": checkpoint_id, "pipeline": self.pipeline,
            "lane": lane_id, "source": key[0], "partition": key[1],
            "position": position, "code_hash": self.code_hash, **body, "files": files,
            "created": time.time(),
        }
        path = f"{base}/manifests/{seq:012d}.json"
        try:
            self._publish(path, json.dumps(manifest).encode())
        except FileExistsError:
            raise LaneTakenOver(f"lane {lane_id}: another process published checkpoint {seq} of this lane "
                                f"at {base}; this process no longer owns the partition and stops") from None
        self._next_seq[key] = seq + 1
        self._last_saved[key] = (json.dumps(files, sort_keys=True), position)
        self._collect_garbage(base)
        log.debug("checkpoint saved", extra={"lane": lane_id, "checkpoint": checkpoint_id,
                                             "files": len(files),
                                             "seconds": round(time.perf_counter() - started, 4)})

    # -- writing ----------------------------------------------------------------------------
    def _write_frames(self, value: Any, base: str, prefix: str, files: dict[str, dict[str, Any]]) -> Any:
        """Replace every DataFrame in a snapshot (in place) by a reference to the file written."""
        if isinstance(value, pl.DataFrame):
            buf = io.BytesIO()
            value.write_ipc(buf, compression="lz4")
            data = buf.getvalue()
            rel = f"state/{prefix}-{len(files)}-{uuid.uuid4().hex[:8]}.arrow"
            if isinstance(self.fs, LocalFileSystem):
                self.fs.makedirs(f"{base}/state", exist_ok=True)
            _WRITE.call(self.fs.pipe_file, f"{base}/{rel}", data)  # a fresh name: safe to retry
            ref = {FRAME_REF: rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                   "rows": value.height}
            files[rel] = {"sha256": ref["sha256"], "bytes": len(data)}
            return ref
        if isinstance(value, dict):
            if FRAME_REF in value:  # written by an earlier checkpoint and unchanged since
                files[value[FRAME_REF]] = {"sha256": value["sha256"], "bytes": value["bytes"]}
                return value
            for k in list(value):
                value[k] = self._write_frames(value[k], base, prefix, files)
            return value
        if isinstance(value, list):
            for i, item in enumerate(value):
                value[i] = self._write_frames(item, base, prefix, files)
            return value
        return value

    def _publish(self, path: str, data: bytes) -> None:
        """Write a new file atomically and exclusively (FileExistsError if it is there already)."""
        if isinstance(self.fs, LocalFileSystem):  # write aside, then hard-link: atomic and exclusive
            self.fs.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{os.path.dirname(path)}/.{uuid.uuid4().hex}.tmp"
            try:
                _WRITE.call(_write_synced, tmp, data)
                os.link(tmp, path)
            finally:
                if os.path.exists(tmp):  # also when the write failed (e.g. a full disk)
                    os.unlink(tmp)
            return
        # one PUT: an object store shows the whole object or none; "create" is If-None-Match on S3
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise
        except OSError as exc:  # s3fs reports a failed precondition as a permission/OS error
            if "PreconditionFailed" in repr(exc) or "412" in repr(exc):
                raise FileExistsError(path) from exc
            raise

    @staticmethod
    def _seq_after(manifests: list[str]) -> int:
        """The number after the newest manifest's (manifests sorted newest first)."""
        for path in manifests:
            stem = os.path.basename(path).removesuffix(".json")
            if stem.isdigit():
                return int(stem) + 1
        return 0

    def _manifests(self, base: str) -> list[str]:
        try:
            names = self.fs.ls(f"{base}/manifests", detail=False)
        except FileNotFoundError:
            return []
        return sorted((n for n in names if n.endswith(".json") and not os.path.basename(n).startswith(".")),
                      reverse=True)

    def _collect_garbage(self, base: str) -> None:
        manifests = self._manifests(base)
        kept, dropped = manifests[:self.keep], manifests[self.keep:]
        for path in dropped:
            self.fs.rm_file(path)
        if not dropped:
            return
        referenced: set[str] = set()
        for path in kept:
            try:
                referenced.update(json.loads(self.fs.cat_file(path))["files"])
            except (OSError, ValueError, KeyError):
                return  # unsure what is still needed: delete nothing
        try:
            present = self.fs.ls(f"{base}/state", detail=False)
        except FileNotFoundError:
            return
        for path in present:
            if f"state/{os.path.basename(path)}" not in referenced:
                self.fs.rm_file(path)

    def _reset_if_asked(self, source: str, partition: str) -> None:
        if self.reset and (source, partition) not in self._reset_done:
            self._reset_done.add((source, partition))
            base = self.lane_dir(source, partition)
            if self.fs.exists(base):
                log.warning("state reset: deleting the lane's checkpoints", extra={"path": base})
                self.fs.rm(base, recursive=True)

    # -- reading ----------------------------------------------------------------------------
    def _load(self, source: str, partition: str,
              bound: Any = UNBOUNDED) -> tuple[dict[str, Any], dict[str, pl.DataFrame]] | None:
        key = (source, partition)
        if key in self._loaded:
            return self._loaded[key]
        self._next_seq[key] = 0  # a reset starts the numbering again
        self._last_saved.pop(key, None)
        result = None
        if not self.reset or key in self._reset_done:  # reset once per lane and run, not per reopen
            base = self.lane_dir(source, partition)
            manifests = self._manifests(base)
            self._next_seq[key] = self._seq_after(manifests)
            for path in manifests:
                try:
                    result = self._read(base, path)
                    if bound is not UNBOUNDED and not _at_or_before(result[0]["position"], bound):
                        log.info("checkpoint is past the committed offset (its transaction did not "
                                 "commit); using an earlier one", extra={
                                     "lane": f"{source}[{partition}]", "manifest": path,
                                     "offset": result[0]["position"], "committed": bound})
                        result = None
                        continue
                    break
                except CorruptCheckpoint as exc:
                    log.error("checkpoint is corrupt; trying the previous one",
                              extra={"lane": f"{source}[{partition}]", "manifest": path, "error": str(exc)})
        self._loaded[key] = result
        return result

    def _read(self, base: str, path: str) -> tuple[dict[str, Any], dict[str, pl.DataFrame]]:
        try:
            manifest = json.loads(self.fs.cat_file(path))
            files = manifest["files"]
        except (OSError, ValueError, KeyError) as exc:
            raise CorruptCheckpoint(f"manifest {path} is unreadable: {exc}") from exc
        if manifest.get("code_hash") != self.code_hash:
            raise StateMismatch(
                f"the checkpoint {manifest.get('checkpoint_id')} at {base} was written by other stateful "
                f"code (state code hash {manifest.get('code_hash')}, now {self.code_hash}): windows, "
                "aggregates or state schemas changed, and the saved state would not fit. Run with "
                "--reset-state (setting state.reset=1) to start over, or use another --checkpoint URL")
        frames: dict[str, pl.DataFrame] = {}
        for rel, meta in files.items():
            try:
                data = self.fs.cat_file(f"{base}/{rel}")
            except OSError as exc:
                raise CorruptCheckpoint(f"state file {rel} is missing: {exc}") from exc
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise CorruptCheckpoint(f"state file {rel} fails its checksum ({len(data)} bytes, "
                                        f"{meta['bytes']} expected)")
            frames[rel] = pl.read_ipc(io.BytesIO(data))
        return manifest, frames


def _substitute(value: Any, frames: dict[str, pl.DataFrame]) -> Any:
    """A copy of a saved snapshot with file references replaced by the loaded frames."""
    if isinstance(value, dict):
        if FRAME_REF in value:
            return frames[value[FRAME_REF]]
        return {k: _substitute(v, frames) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, frames) for v in value]
    return value


def _write_synced(path: str, data: bytes) -> None:
    """Write a file and make it durable before it is linked into place."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _at_or_before(position: Position, bound: Position) -> bool:
    """Whether a checkpoint's position is at or before a committed offset (None: nothing committed)."""
    return bound is not None and isinstance(position, int) and isinstance(bound, int) and position <= bound
