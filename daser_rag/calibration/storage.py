"""The calibration file: safetensors with a header that names the model and a checksum.

Header metadata: format, version, the model fingerprint, the digest of the tensors (which
covers the fingerprint too) and free-form JSON (`meta`: how it was trained, held-out numbers).
Loading checks all of it: a file for another model, a changed or truncated file, tensors of the
wrong shape or non-finite numbers raise `CalibrationFileError`, never a silent fallback.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daser_rag.errors import DaserError

FORMAT = "daser-calibration"


class CalibrationFileError(DaserError, ValueError):
    """A calibration file that cannot be used: corrupt, for another model, or of the wrong shape."""


def default_path(cache_dir: str | Path, fingerprint: str, fit_share: float = 0.0) -> Path:
    """Where `daser-rag calibrate` writes a model's calibration: one file per fingerprint and
    regime (fitted at r = 0, or at a recompute share: `-r<share>` before the suffix)."""
    regime = f"-r{fit_share:g}" if fit_share > 0 else ""
    return Path(cache_dir) / "calibration" / f"{fingerprint[:32]}{regime}.safetensors"


def save(cal: Any, path: str | Path) -> Path:
    """Write atomically (a temp file renamed into place), so a reader never sees half a file."""
    from safetensors.torch import save_file

    from daser_rag.calibration.adapter import VERSION

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": str(VERSION), "fingerprint": cal.fingerprint, "checksum": cal.digest(),
            "chunk_side": "1" if cal.chunk_side else "0", "fit_share": repr(float(cal.fit_share)),
            "meta": json.dumps(cal.meta, default=str)}
    tmp = _temp_name(path)
    try:
        save_file(cal.tensors(), str(tmp), metadata=meta)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _temp_name(path: Path) -> Path:
    """A temp file beside `path` no other writer uses (several processes may publish one digest)."""
    import os
    import secrets

    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def load(path: str | Path, *, fingerprint: str, layers: int, kv_heads: int, hidden: int,
         head_dim: int | None = None, vocab: int | None = None, aliases: Sequence[str] = ()) -> Any:
    """The calibration in `path`, checked against the model it is meant for. `aliases`: other
    fingerprints of the same weights (the vLLM control plane names them by their served files,
    daser's own engine, which `daser-rag calibrate` runs, by the loaded model): a file made for
    one is accepted and renamed to `fingerprint`, after its checksum is verified."""
    cal = _read(path, fingerprint, aliases)
    try:
        cal.check_shape(layers, kv_heads, hidden, head_dim, vocab)
    except ValueError as e:
        raise CalibrationFileError(f"calibration file {str(path)!r}: {e}") from e
    return _named_for(cal, fingerprint)


def _read(path: str | Path, fingerprint: str, aliases: Sequence[str] = ()) -> Any:
    """The calibration in `path` after every check that needs no model shapes: format, version,
    made for `fingerprint` (or one of `aliases`), known tensors, checksum."""
    from safetensors import safe_open

    from daser_rag.calibration.adapter import VERSION, Calibration

    path = Path(path)
    if not path.is_file():
        raise CalibrationFileError(f"calibration file {str(path)!r} does not exist (run `daser-rag calibrate`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise CalibrationFileError(f"calibration file {str(path)!r} is corrupt: {e}") from e
    if header.get("format") != FORMAT or header.get("version") != str(VERSION):
        raise CalibrationFileError(f"{str(path)!r} is not a version-{VERSION} daser calibration file "
                                   f"(format {header.get('format')!r}, version {header.get('version')!r})")
    made_for = header.get("fingerprint")
    if made_for != fingerprint and made_for not in aliases:
        raise CalibrationFileError(f"calibration file {str(path)!r} was made for model {header.get('fingerprint')!r}, "
                                   f"not this model ({fingerprint}); recalibrate")
    missing = {"key_log_scale", "value_log_scale", "link"} - set(tensors)
    if missing:
        raise CalibrationFileError(f"calibration file {str(path)!r} lacks {sorted(missing)}")
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError as e:
        raise CalibrationFileError(f"calibration file {str(path)!r} has a corrupt header: {e}") from e
    try:
        fit_share = float(header.get("fit_share", "0.0"))
    except ValueError:
        raise CalibrationFileError(f"calibration file {str(path)!r} has a corrupt fit_share "
                                   f"{header.get('fit_share')!r}") from None
    if not 0.0 <= fit_share < 1.0:
        raise CalibrationFileError(f"calibration file {str(path)!r} has fit_share {fit_share}, not in [0, 1)")
    unknown = set(tensors) - {"key_log_scale", "value_log_scale", "link", "key_bias", "value_bias", "kv_map",
                              "primer"}
    if unknown:
        raise CalibrationFileError(f"calibration file {str(path)!r} holds tensors this version does not know: "
                                   f"{sorted(unknown)} (made by a newer daser-rag?)")
    cal = Calibration(str(made_for), tensors["key_log_scale"], tensors["value_log_scale"], tensors["link"], meta,
                      header.get("chunk_side") == "1", fit_share, tensors.get("key_bias"), tensors.get("value_bias"),
                      tensors.get("kv_map"), tensors.get("primer"))
    if cal.digest() != header.get("checksum"):
        raise CalibrationFileError(f"calibration file {str(path)!r} fails its checksum (changed or damaged)")
    return cal


def _named_for(cal: Any, fingerprint: str) -> Any:
    """`cal` under `fingerprint` (an alias of the fingerprint it was made for, checked by the
    caller), the one it was made for kept in its meta."""
    if cal.fingerprint == fingerprint:
        return cal
    return dataclasses.replace(cal, fingerprint=fingerprint, meta={**cal.meta, "made_for": cal.fingerprint})


def load_for(path: str | Path, runner: Any, fingerprint: str, aliases: Sequence[str] = ()) -> Any:
    """`load` with the shape facts of a model: anything with `.spec` (a LayerRunner, or ModelFiles for the
    weight-free control plane)."""
    spec = runner.spec
    return load(path, fingerprint=fingerprint, layers=spec.num_layers, kv_heads=spec.num_kv_heads,
                hidden=spec.hidden_size, head_dim=spec.head_dim, vocab=getattr(spec, "vocab_size", None),
                aliases=aliases)


def published_path(root: str | Path, digest: str) -> Path:
    """Where a calibration is published for vLLM connectors, by its digest: a plan names the
    digest (a token map's 1.5M numbers do not travel in a plan), the connector reads the file
    from the store directory it shares with the control plane."""
    if len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
        raise CalibrationFileError(f"not a calibration digest: {digest!r}")
    return Path(root) / "calibration" / "by-digest" / f"{digest}.safetensors"


def _remote_key(link: Any, digest: str) -> str:
    return str(link.key("calibration", digest))


def publish(cal: Any, root: str | Path, link: Any = None) -> Path:
    """Write `cal` to `published_path` unless a file with its checksum is already there; with
    `link` (the shared Redis, `kv.tiers.redis.RedisLink`) also store the file's bytes there, so
    vLLM instances on other hosts fetch it (`read_published`) without a shared disk. The Redis
    copy has no TTL, like the document index (a plan naming it must find it); it is one value per
    calibration the control plane loads (a handful; about 6 MB each with a token map for
    SmolLM2-135M). Redis away: logged, the local file still serves this host."""
    path = published_path(root, cal.digest())
    try:
        if _read(path, cal.fingerprint).digest() != cal.digest():
            raise CalibrationFileError("another calibration")
    except CalibrationFileError:  # missing or damaged: (re)written
        save(cal, path)
    if link is not None:
        data = path.read_bytes()
        try:
            link.run(lambda c: c.set(_remote_key(link, cal.digest()), data))
        except DaserError as exc:
            import logging

            logging.getLogger(__name__).warning("calibration %s not published to Redis (%s): vLLM instances on "
                                                "other hosts cannot read it until it is", cal.digest(), exc)
    return path


def read_published(root: str | Path, digest: str, *, fingerprint: str, link: Any = None) -> Any:
    """The calibration a plan names by `digest`, verified (format, made for `fingerprint`,
    checksum, digest) without model shapes: what a vLLM connector's scheduler checks before it
    lets a plan claim re-positioned KV. A file missing or damaged in `root` is fetched from the
    shared Redis (`link`, where `publish` put it), verified, and written atomically into `root`
    for the workers; a damaged Redis copy is never written or used. CalibrationFileError says
    why it cannot be had."""
    path = published_path(root, digest)
    try:
        return _digest_checked(_read(path, fingerprint), digest)
    except CalibrationFileError as local:
        if link is None:
            raise
        try:
            data = link.run(lambda c: c.get(_remote_key(link, digest)))
        except DaserError as exc:
            raise CalibrationFileError(f"{local}; and Redis could not be asked for it: {exc}") from exc
        if data is None:
            raise CalibrationFileError(f"{local}; nor is it published in Redis") from local
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(path)
        try:
            tmp.write_bytes(bytes(data))
            try:
                cal = _digest_checked(_read(tmp, fingerprint), digest)  # verified before it is put in place
            except CalibrationFileError as exc:
                raise CalibrationFileError(f"{local}; and its Redis copy is unusable: {exc}") from exc
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return cal


def _digest_checked(cal: Any, digest: str) -> Any:
    if cal.digest() != digest:
        raise CalibrationFileError(f"published calibration {digest} holds another calibration ({cal.digest()})")
    return cal


def load_published(root: str | Path, digest: str, *, fingerprint: str, layers: int, kv_heads: int,
                   head_dim: int) -> Any:
    """The calibration a plan names by `digest`, checked like `load` and against the digest."""
    cal = load(published_path(root, digest), fingerprint=fingerprint, layers=layers, kv_heads=kv_heads, hidden=0,
               head_dim=head_dim)
    return _digest_checked(cal, digest)


def _model_files(cache_root: str | Path, fingerprint: str) -> list[Path]:
    """The model's calibration files under the cache dir (r = 0 and fitted at a share)."""
    folder = default_path(cache_root, fingerprint).parent
    stem = fingerprint[:32]
    return sorted(p for p in folder.glob(f"{stem}*.safetensors")
                  if p.name == f"{stem}.safetensors" or p.name.startswith(f"{stem}-r"))


def _auto_files(cache_root: str | Path, fingerprints: Sequence[str]) -> list[Path]:
    """The files `auto` loads: per regime (r = 0, each fitted share) the first fingerprint's."""
    paths: list[Path] = []
    regimes: set[str] = set()
    for fp in fingerprints:
        for p in _model_files(cache_root, fp):
            regime = p.name[len(fp[:32]):]  # the suffix, after "-r<share>" when fitted at a share
            if regime not in regimes:
                regimes.add(regime)
                paths.append(p)
    return paths


def resolve_calibration(value: Any, runner: Any, fingerprint: str, cache_root: str | Path | None,
                        aliases: Sequence[str] = ()) -> Any:
    """The engine's `calibration` option as a CalibrationSet or None.

    None / "off": none. "auto": the model's files under the cache dir (one fitted at r = 0,
    one at a recompute share), none when there are none; files named for an alias (another
    fingerprint of the same weights, see `load`) fill the regimes the model's own do not. A path,
    or several joined by commas: those files, which must load. A Calibration (or a list of
    them): checked like a file.
    """
    from daser_rag.calibration.adapter import Calibration, CalibrationSet

    if value is None or value == "off":
        return None
    if isinstance(value, CalibrationSet):
        value = list(value.members)
    if isinstance(value, (str, Path)):
        if value == "auto":
            paths = _auto_files(cache_root, (fingerprint, *aliases)) if cache_root is not None else []
        else:
            paths = [Path(p.strip()) for p in str(value).split(",") if p.strip()]
        members = [load_for(p, runner, fingerprint, aliases) for p in paths]
    else:
        members = list(value) if isinstance(value, (list, tuple)) else [value]
        spec = runner.spec
        for c in members:
            if not isinstance(c, Calibration):
                raise CalibrationFileError("calibration must be 'off', 'auto', a path or a Calibration, "
                                           f"got {type(c).__name__}")
            if c.fingerprint != fingerprint and c.fingerprint not in aliases:
                raise CalibrationFileError(f"this calibration was made for model {c.fingerprint!r}, not {fingerprint!r}")
            try:
                c.check_shape(spec.num_layers, spec.num_kv_heads, spec.hidden_size, spec.head_dim,
                              getattr(spec, "vocab_size", None))
            except ValueError as e:
                raise CalibrationFileError(str(e)) from e
        members = [_named_for(c, fingerprint) for c in members]
    if not members:
        return None
    try:
        return CalibrationSet(tuple(members))
    except ValueError as e:
        raise CalibrationFileError(str(e)) from e
