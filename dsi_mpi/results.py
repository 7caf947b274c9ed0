"""The output file: records streamed as their prompts finish, read back, and resumed (pure I/O).

Rank 0 appends each record the moment its prompt finishes: the whole line in one ``write`` to
a file opened with ``O_APPEND``, then ``fsync``. A job killed at any moment (SIGKILL, a node
lost, a time limit) leaves a valid JSONL file of every prompt finished before, and rank 0
holds no list of records. A torn line (a crash of the node or a full disk during a write) can
only be the last one; :func:`read_records` skips unreadable lines, and ``--resume`` cuts a
torn tail off before it appends.

``--resume`` skips every (mode, prompt index, repeat) already in the file and appends the
rest, so a requeued job completes the file to what one uninterrupted run writes. It first
checks that the file was written by this run (same models, lookahead, SP, sampling, prompts):
a mix of two runs would look like one. An existing file without ``--resume`` or
``--overwrite`` is an error that names both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dsi_mpi.config import ConfigError, RunConfig

if TYPE_CHECKING:
    from dsi_mpi.preflight import Prompt
    from dsi_mpi.roles import Layout

Key = tuple[str, int, int]  # (mode, prompt_index, repeat): one record of a run


def identity(config: RunConfig, sp: int, prompt_tokens: int, seed: int | None = None) -> dict:
    """The fields of a record that tell which run wrote it: what ``--resume`` matches an
    existing output on. The one definition: the runtime writes them into every record
    (``runtime.record``) and :func:`planned` plans them for every record it will write.
    ``seed``: the prompt's own, where it has one."""
    uses_drafter = config.uses_drafter
    return {
        "prompt_tokens": prompt_tokens,
        "lookahead": config.lookahead if uses_drafter else 0,
        "min_drafts": config.min_drafts if config.mode == "dsi" else 1,
        "sp": sp,
        "tp_size": config.target_ranks,  # ranks per target server (--target-ranks)
        "verify": config.verify,
        "temperature": config.sampling.temperature,
        "seed": config.sampling.seed if seed is None else seed,
        "target": config.target,
        "drafter": config.drafter if uses_drafter else None,
        "max_new_tokens": config.max_new_tokens,
        # how the model ranks ran their forwards (eager, static, cudagraph; None: emulated)
        "engine": config.engine_name,
    }


def planned(configs: Sequence[RunConfig], layout: Layout, prompts: Sequence[Prompt],
            repeats: int) -> dict[Key, dict]:
    """Every record a run writes, by (mode, prompt index, repeat), with the fields that tell
    which run wrote it (:func:`identity`, as ``runtime.record`` writes them): what
    ``--resume`` checks an existing output against."""
    out = {}
    for config in configs:
        sp = len(layout.active_targets(config.mode, config.sp))
        for repeat in range(repeats):
            for index, prompt in enumerate(prompts):
                out[(config.mode, index, repeat)] = identity(config, sp, len(prompt.ids),
                                                                     prompt.seed)
    return out


def key_of(record: Mapping) -> Key:
    return (record["mode"], record["prompt_index"], record.get("repeat", 0))


def _parse(line: bytes) -> dict | None:
    """A complete line's record, or None for a torn or foreign line."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
        key_of(record)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def read_records(path: str) -> tuple[list[dict], int]:
    """The records of an output file, and how many lines were skipped as unreadable (a torn
    last line after a crash)."""
    records, skipped = [], 0
    with open(path, "rb") as fh:
        for line in fh:
            record = _parse(line)
            if record is None:
                skipped += 1
            else:
                records.append(record)
    return records, skipped


def check_flags(path: str, resume: bool, overwrite: bool) -> None:
    """Before anything else: an existing output needs ``--resume`` or ``--overwrite``."""
    if os.path.isdir(path):
        raise ConfigError(f"--output {path!r} is a directory; give a file name (out.jsonl)")
    if os.path.exists(path) and not (resume or overwrite):
        raise ConfigError(
            f"--output {path!r} exists: pass --resume to finish it (its records are kept and "
            "only the missing ones run) or --overwrite to replace it"
        )


@dataclass(frozen=True)
class Resumed:
    done: frozenset[Key]  # records already in the file
    dropped_tail: bool  # a torn last line was cut off


def _resume(path: str, planned: Mapping[Key, Mapping]) -> Resumed:
    """What an existing output holds, checked against the records this run writes; cuts a
    torn last line off."""
    done: set[Key] = set()
    good_end = 0  # byte offset after the last readable line
    torn_at: int | None = None  # line number of an unreadable line
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            record = _parse(line)
            if record is None:
                if not line.strip() and line.endswith(b"\n"):
                    good_end += len(line)  # a blank line: harmless
                    continue
                torn_at = torn_at or number
                continue
            if torn_at is not None:
                raise ConfigError(
                    f"--resume: {path}:{torn_at} is not a record (a torn or edited line) and "
                    "records follow it: delete that line, or start again with --overwrite"
                )
            good_end += len(line)
            key = key_of(record)
            mode, index, repeat = key
            expected = planned.get(key)
            if expected is None:
                raise ConfigError(
                    f"--resume: {path}:{number} holds mode {mode}, prompt {index}, repeat "
                    f"{repeat}, which this run does not make: resume with the command line that "
                    "wrote it, or start again with --overwrite"
                )
            for name, value in expected.items():
                # records from before --target-ranks and --min-drafts were written with 1
                written = record.get(name, 1 if name in ("tp_size", "min_drafts") else value)
                if written != value:
                    raise ConfigError(
                        f"--resume: {path}:{number} was written with {name} {written!r}, this "
                        f"run has {value!r}: resume with the command line that wrote it, "
                        "or start again with --overwrite"
                    )
            done.add(key)
    if torn_at is not None:
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
            os.fsync(fh.fileno())
    return Resumed(frozenset(done), torn_at is not None)


class ResultsFile:
    """Appends records to the output, each line written whole and on disk before the next.

    The file is created by the first record: a run that ends before any prompt finished
    leaves no file (and the next run needs neither ``--resume`` nor ``--overwrite``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self.written = 0  # records appended by this run

    def append(self, record: Mapping) -> None:
        if self._fd < 0:
            created = not os.path.exists(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            if created:  # the new directory entry survives a crash too
                _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        data = (json.dumps(record) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:  # one write for a regular file; a short write (a full disk) continues
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)
        self.written += 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync directories
    finally:
        os.close(fd)


def open_output(
    path: str, resume: bool, overwrite: bool, planned: Mapping[Key, Mapping]
) -> tuple[ResultsFile, Resumed]:
    """The output, ready for appending: removed with ``overwrite`` (so a failed run never
    leaves the old file looking like its own), checked and trimmed with ``resume``.
    ``planned`` maps each record this run writes to its :func:`identity`."""
    check_flags(path, resume, overwrite)
    resumed = Resumed(frozenset(), False)
    if resume and os.path.exists(path):
        resumed = _resume(path, planned)
    if overwrite and os.path.exists(path):
        os.unlink(path)
    return ResultsFile(path), resumed
