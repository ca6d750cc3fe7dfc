"""On-disk form of an influence index: a manifest, NumPy shards, atomic writes, checksums and the fingerprint.

An index directory ``path/`` holds (see :mod:`~deel.influenciae.common.influence_index` for the user's side):

``manifest.json``
    A JSON object (keys sorted, written atomically) with

    * ``format`` (``"deel-influenciae/influence-index"``) and ``format_version`` (1);
    * ``library_version``: the version of influenciae that wrote it;
    * ``fingerprint``: SHA-256 (hex) of the calculator's class, its configuration and the weights it uses (below);
    * ``configuration``: the readable content of the fingerprint: ``calculator`` (qualified class name),
      ``configuration`` (``calculator._index_configuration()``), ``models`` (per model: its kind and numbers of
      weights and parameters) and ``weights_sha256``;
    * ``dtype``: storage dtype of the floating vectors, ``"float16"`` or ``"float32"``;
    * ``shard_size``: rows per shard (the last shard may be shorter);
    * ``structure``: how the vectors are nested, null until the first vectors are written: ``{"leaf": name}``,
      ``{"tuple": [...]}``, ``{"list": [...]}`` or ``{"dict": [[key, ...], ...]}`` (keys sorted);
    * ``leaves``: one entry per leaf in that order: ``name``, ``path`` (position in the structure, e.g. ``"0"``),
      ``shape`` (without the row axis), ``dtype`` (stored) and ``source_dtype`` (as the calculator computed it);
    * ``shards``: the completed shards, in order: ``index``, ``first_row``, ``rows`` and ``files``, mapping each
      leaf name to ``{"file", "bytes", "sha256"}``;
    * ``complete``: whether every training sample was written; ``size``: the number of rows N once complete
      (null before).

``shard_00000.<leaf>.npy``, ``shard_00001.<leaf>.npy``, ...
    One ``.npy`` file (``numpy.save`` format, C order) per shard and leaf: ``(rows, *shape)`` of the leaf's stored
    dtype, rows ``first_row .. first_row + rows - 1`` in the training set's iteration order. Floating leaves are
    stored in ``dtype``; other leaves in their own dtype. A single (B, D) vector tensor is the leaf ``vectors``; the
    leaves of a structure are ``vectors0``, ``vectors1``, ... in ``tf.nest.flatten`` order.

Writes are atomic: a file is written under a temporary name (``.tmp.<name>.<random>``) in the same directory,
flushed, fsynced and renamed over its final name (``os.replace``); the manifest is rewritten the same way after
every shard, listing it. A killed run may leave temporary files (removed by the next build) or a shard file that
the manifest does not list (rewritten by the next build), never a listed shard that is incomplete. Every listed
shard of an incomplete index is full (``shard_size`` rows): the last, shorter shard is listed together with
``complete: true``.

Fingerprint: SHA-256 over the calculator's class qualified name, the canonical JSON of its configuration
(``_index_configuration()``) and, for every model of the calculator (``calculator.models``, else
``calculator.model``), the shapes, dtypes and bytes of the watched weights of an :class:`InfluenceModel` (and
their positions in the Keras model's weights) and of every weight of the underlying Keras model, in order. Variable
names are left out: Keras names layers by creation order, which differs between processes.
"""
import hashlib
import json
import os
import re
import uuid
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

import keras
import numpy as np

from ..version import __version__
from .model_wrappers import BaseInfluenceModel

FORMAT_NAME = "deel-influenciae/influence-index"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STORAGE_DTYPES = ("float16", "float32")
TEMP_PREFIX = ".tmp."
SHARD_PATTERN = re.compile(r"^shard_\d{5,}\.[A-Za-z0-9_]+\.npy$")
_REQUIRED_KEYS = {"format": str, "format_version": int, "library_version": str, "fingerprint": str,
                  "configuration": dict, "dtype": str, "shard_size": int, "structure": (dict, type(None)),
                  "leaves": (list, type(None)), "shards": list, "complete": bool, "size": (int, type(None))}
_READ_CHUNK = 1 << 22


class IndexFormatError(ValueError):
    """A directory is not a readable influence index (corrupted, truncated or foreign files)."""


# Arguments ----------------------------------------------------------------------------------------
def check_storage_dtype(dtype: Any) -> str:
    """``dtype`` as ``"float16"`` or ``"float32"`` (NumPy and TensorFlow dtypes accepted).

    Raises
    ------
    ValueError
        For any other dtype.
    """
    name = getattr(dtype, "name", dtype)
    if isinstance(name, str) and name in STORAGE_DTYPES:
        return name
    raise ValueError(f"dtype must be 'float16' or 'float32' (the storage dtype of the vectors), got {dtype!r}.")


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as a Python int; ``ValueError`` naming ``name`` unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def check_path(path: Any) -> str:
    """``path`` as a string; ``TypeError`` unless it is a ``str`` or ``os.PathLike``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (a directory), got {type(path).__name__}.")
    return os.fspath(path)


# Structures of vectors ------------------------------------------------------------------------------
def flatten_vectors(structure: Any) -> List[Any]:
    """The leaves of a vector structure (a tensor, or tuples, lists and dicts with string keys of them), in
    ``tf.nest.flatten`` order (dict keys sorted).

    Raises
    ------
    TypeError
        For a dict key that is not a string.
    """
    if isinstance(structure, (tuple, list)):
        return [leaf for item in structure for leaf in flatten_vectors(item)]
    if isinstance(structure, dict):
        _check_keys(structure)
        return [leaf for key in sorted(structure) for leaf in flatten_vectors(structure[key])]
    return [structure]


def encode_structure(structure: Any) -> Tuple[Dict[str, Any], List[Tuple[str, str]]]:
    """``(JSON structure, [(leaf name, path in the structure)])`` of a vector structure."""
    if not isinstance(structure, (tuple, list, dict)):
        return {"leaf": "vectors"}, [("vectors", "")]
    leaves: List[Tuple[str, str]] = []

    def encode(item: Any, path: str) -> Dict[str, Any]:
        if isinstance(item, (tuple, list)):
            return {"tuple" if isinstance(item, tuple) else "list": [encode(child, f"{path}/{position}".lstrip("/"))
                                                                   for position, child in enumerate(item)]}
        if isinstance(item, dict):
            _check_keys(item)
            return {"dict": [[key, encode(item[key], f"{path}/{key}".lstrip("/"))] for key in sorted(item)]}
        name = f"vectors{len(leaves)}"
        leaves.append((name, path))
        return {"leaf": name}

    return encode(structure, ""), leaves


def pack_vectors(encoded: Dict[str, Any], leaves: Dict[str, Any]) -> Any:
    """Rebuild a vector structure from its JSON form and its leaves by name."""
    if "leaf" in encoded:
        return leaves[encoded["leaf"]]
    if "tuple" in encoded:
        return tuple(pack_vectors(child, leaves) for child in encoded["tuple"])
    if "list" in encoded:
        return [pack_vectors(child, leaves) for child in encoded["list"]]
    return {key: pack_vectors(child, leaves) for key, child in encoded["dict"]}


def _check_keys(mapping: dict) -> None:
    if not all(isinstance(key, str) for key in mapping):
        raise TypeError(f"Influence vectors given as a dict need string keys, got {sorted(map(repr, mapping))}.")


# Files ---------------------------------------------------------------------------------------------
def shard_file_name(index: int, leaf: str) -> str:
    """File name of one leaf of one shard: ``shard_00000.<leaf>.npy``."""
    return f"shard_{index:05d}.{leaf}.npy"


class _HashingWriter:
    """A writable stream that hashes what it forwards (``numpy.save`` then writes in chunks, without a copy of the
    whole array)."""

    def __init__(self, stream):
        self.stream = stream
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        """Hash and write ``data``."""
        view = memoryview(data)
        self.digest.update(view)
        self.bytes += view.nbytes
        return self.stream.write(data)


def _temporary_name(directory: str, name: str) -> str:
    return os.path.join(directory, f"{TEMP_PREFIX}{name}.{uuid.uuid4().hex}")


def _sync_directory(directory: str) -> None:
    """Make renames in ``directory`` durable where the platform allows it."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write(directory: str, name: str, write: Callable[[BinaryIO], Any]) -> Any:
    """Write ``directory/name`` atomically: ``write(stream)`` into a temporary file of the same directory, flushed
    and synced, then renamed over ``name`` (a reader sees the old file or the new one, never a part); the temporary
    file is removed if anything fails. Returns what ``write`` returned."""
    temporary = _temporary_name(directory, name)
    try:
        with open(temporary, "wb") as stream:
            result = write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return result


def atomic_save_array(directory: str, name: str, array: np.ndarray) -> Dict[str, Any]:
    """Write ``array`` to ``directory/name`` (``.npy``) atomically; return ``{"file", "bytes", "sha256"}``."""
    def write(stream: BinaryIO) -> _HashingWriter:
        writer = _HashingWriter(stream)
        np.lib.format.write_array(writer, np.ascontiguousarray(array), allow_pickle=False)
        return writer

    writer = atomic_write(directory, name, write)
    return {"file": name, "bytes": writer.bytes, "sha256": writer.digest.hexdigest()}


def atomic_write_manifest(directory: str, manifest: Dict[str, Any]) -> None:
    """Write ``manifest`` to ``directory/manifest.json`` atomically (keys sorted: the same content gives the same
    bytes)."""
    data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    atomic_write(directory, MANIFEST_NAME, lambda stream: stream.write(data))
    _sync_directory(directory)


def remove_leftovers(directory: str, manifest: Dict[str, Any]) -> None:
    """Remove the temporary files of an interrupted build and the shard files its manifest does not list."""
    listed = {entry["file"] for shard in manifest["shards"] for entry in shard["files"].values()}
    for name in os.listdir(directory):
        if name.startswith(TEMP_PREFIX) or (SHARD_PATTERN.match(name) and name not in listed):
            os.remove(os.path.join(directory, name))


def sha256_file(path: str) -> str:
    """SHA-256 (hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_READ_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Manifest ------------------------------------------------------------------------------------------
def new_manifest(fingerprint: str, configuration: Dict[str, Any], dtype: str, shard_size: int) -> Dict[str, Any]:
    """The manifest of an index before any shard is written."""
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "library_version": __version__,
            "fingerprint": fingerprint, "configuration": configuration, "dtype": dtype, "shard_size": shard_size,
            "structure": None, "leaves": None, "shards": [], "complete": False, "size": None}


def read_manifest(directory: str) -> Dict[str, Any]:
    """The manifest of the index in ``directory``, checked for its keys and their types, and for contiguous
    shards.

    Raises
    ------
    FileNotFoundError
        If ``directory/manifest.json`` does not exist.
    ValueError
        If it is not JSON, not an influence index's manifest, of a newer format version, or inconsistent (the
        message names the file).
    """
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No influence index at {directory!r}: {path!r} does not exist.")
    try:
        with open(path, "rb") as stream:
            manifest = json.loads(stream.read().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IndexFormatError(f"The manifest {path!r} is not valid JSON ({error}): the index is corrupted; "
                               "delete the directory and build the index again.") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{path!r} is not the manifest of an influence index (format "
                               f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected "
                               f"{FORMAT_NAME!r}).")
    for key, types in _REQUIRED_KEYS.items():
        if key not in manifest:
            raise IndexFormatError(f"The manifest {path!r} misses the key {key!r}: the index is corrupted.")
        value = manifest[key]
        if not isinstance(value, types) or (isinstance(value, bool) and types is int):
            raise IndexFormatError(f"The manifest {path!r} holds {key}={value!r} of type {type(value).__name__}: "
                                   "the index is corrupted.")
    if manifest["format_version"] > FORMAT_VERSION:
        raise IndexFormatError(f"The index {directory!r} has format version {manifest['format_version']}; this "
                               f"version of influenciae ({__version__}) reads up to {FORMAT_VERSION}: upgrade it.")
    _check_manifest_consistency(manifest, path)
    return manifest


def _check_manifest_consistency(manifest: Dict[str, Any], path: str) -> None:
    def corrupted(detail: str) -> IndexFormatError:
        return IndexFormatError(f"The manifest {path!r} is inconsistent ({detail}): the index is corrupted; delete "
                                "the directory and build the index again.")

    if manifest["dtype"] not in STORAGE_DTYPES or manifest["shard_size"] < 1:
        raise corrupted(f"dtype={manifest['dtype']!r}, shard_size={manifest['shard_size']!r}")
    if (manifest["structure"] is None) != (manifest["leaves"] is None):
        raise corrupted("structure and leaves must be given together")
    if manifest["shards"] and manifest["leaves"] is None:
        raise corrupted("shards listed without leaves")
    names = [leaf.get("name") for leaf in manifest["leaves"] or [] if isinstance(leaf, dict)]
    for leaf in manifest["leaves"] or []:
        if not (isinstance(leaf, dict) and isinstance(leaf.get("name"), str) and isinstance(leaf.get("shape"), list)
                and isinstance(leaf.get("dtype"), str) and _is_dtype(leaf["dtype"])):
            raise corrupted(f"leaf entry {leaf!r}")
    row = 0
    for position, shard in enumerate(manifest["shards"]):
        if not (isinstance(shard, dict) and shard.get("index") == position and shard.get("first_row") == row
                and isinstance(shard.get("rows"), int) and shard["rows"] >= 1 and isinstance(shard.get("files"), dict)
                and sorted(shard["files"]) == sorted(names)):
            raise corrupted(f"shard entry {position}")
        last = position == len(manifest["shards"]) - 1
        if shard["rows"] > manifest["shard_size"] or (shard["rows"] < manifest["shard_size"] and not
                                                      (last and manifest["complete"])):
            raise corrupted(f"shard {position} has {shard['rows']} rows with shard_size={manifest['shard_size']}")
        for entry in shard["files"].values():
            if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and
                    isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
                    and os.path.basename(entry["file"]) == entry["file"]):
                raise corrupted(f"file entry {entry!r} of shard {position}")
        row += shard["rows"]
    if manifest["complete"] and manifest["size"] != row:
        raise corrupted(f"size={manifest['size']!r} but the shards hold {row} rows")


def _is_dtype(name: str) -> bool:
    try:
        np.dtype(name)
    except TypeError:
        return False
    return True


def open_shard_file(directory: str, entry: Dict[str, Any], rows: int, leaf: Dict[str, Any],
                    verify: bool) -> np.ndarray:
    """Memory-map one shard file, checking its size, shape and dtype (and its SHA-256 when ``verify``).

    Raises
    ------
    ValueError
        Naming the file when it is missing, truncated, of another shape or dtype, or fails its checksum.
    """
    path = os.path.join(directory, entry["file"])
    advice = "the index is corrupted; delete the directory and build the index again."
    if not os.path.isfile(path):
        raise IndexFormatError(f"The shard file {path!r} listed in the manifest is missing: {advice}")
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise IndexFormatError(f"The shard file {path!r} has {size} bytes, the manifest records {entry['bytes']} "
                               f"(truncated or altered): {advice}")
    if verify and sha256_file(path) != entry["sha256"]:
        raise IndexFormatError(f"The shard file {path!r} fails its SHA-256 checksum (altered on disk): {advice}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise IndexFormatError(f"The shard file {path!r} cannot be read as a .npy array ({error}): {advice}") \
            from error
    expected = (rows, *leaf["shape"])
    if tuple(array.shape) != expected or array.dtype != np.dtype(leaf["dtype"]):
        raise IndexFormatError(f"The shard file {path!r} holds an array {tuple(array.shape)} of {array.dtype}, "
                               f"expected {expected} of {leaf['dtype']}: {advice}")
    return array


# Fingerprint ---------------------------------------------------------------------------------------
def calculator_models(calculator: Any) -> List[Any]:
    """The models whose weights the calculator uses: ``calculator.models`` (a list), else ``[calculator.model]``."""
    models = getattr(calculator, "models", None)
    if isinstance(models, (list, tuple)):
        return list(models)
    model = getattr(calculator, "model", None)
    return [] if model is None else [model]


def _hash_variables(digest: Any, variables: List[Any]) -> int:
    """Feed the shapes, dtypes and bytes of ``variables`` to ``digest``; return their number of values."""
    count = 0
    for variable in variables:
        value = np.ascontiguousarray(variable.numpy() if hasattr(variable, "numpy") else np.asarray(variable))
        digest.update(f"{value.dtype.str}{value.shape}".encode())
        digest.update(value.tobytes())
        count += int(value.size)
    return count


def describe_loss(loss_function: Any) -> Dict[str, Any]:
    """The class (or function) of a loss and, for Keras losses, the JSON-serialisable part of its configuration:
    what the gradients depend on besides the weights."""
    kind = loss_function if callable(loss_function) and not hasattr(loss_function, "get_config") else \
        type(loss_function)
    description: Dict[str, Any] = {"name": f"{getattr(kind, '__module__', '')}.{getattr(kind, '__qualname__', kind)}"}
    get_config = getattr(loss_function, "get_config", None)
    if callable(get_config):
        try:
            config = get_config()
        except (TypeError, ValueError, NotImplementedError):
            config = {}
        description["config"] = {key: value for key, value in sorted(config.items())
                                 if key != "name" and _json_safe(value)}
    return description


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def calculator_fingerprint(calculator: Any) -> Tuple[str, Dict[str, Any]]:
    """``(fingerprint, readable configuration)`` of a calculator (see the module's docstring).

    Raises
    ------
    TypeError
        If ``calculator._index_configuration()`` is not JSON-serialisable.
    """
    cls = type(calculator)
    name = f"{cls.__module__}.{cls.__qualname__}"
    configure = getattr(calculator, "_index_configuration", None)
    configuration = configure() if callable(configure) else {}
    try:
        canonical = json.dumps(configuration, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name}._index_configuration() must return a JSON-serialisable dict, got "
                        f"{configuration!r} ({error}).") from error
    digest = hashlib.sha256()
    digest.update(f"calculator\0{name}\0configuration\0{canonical}\0".encode())
    weights_digest = hashlib.sha256()
    described = []
    for position, model in enumerate(calculator_models(calculator)):
        weights_digest.update(f"model {position}\0".encode())
        keras_model: Optional[keras.Model] = None
        entry: Dict[str, Any] = {"kind": type(model).__name__}
        if isinstance(model, BaseInfluenceModel):
            keras_model = model.model
            all_weights = list(keras_model.weights)
            positions = [next((where for where, candidate in enumerate(all_weights) if candidate is variable), -1)
                         for variable in model.weights]
            weights_digest.update(f"watched {positions}\0".encode())
            entry["watched_parameters"] = _hash_variables(weights_digest, list(model.weights))
            entry["watched_weights"] = len(model.weights)
            entry["loss"] = describe_loss(model.loss_function)
            weights_digest.update(f"loss {json.dumps(entry['loss'], sort_keys=True)}\0".encode())
        elif isinstance(model, keras.Model):
            keras_model = model
        if keras_model is not None:
            weights_digest.update(b"keras model\0")
            entry["parameters"] = _hash_variables(weights_digest, list(keras_model.weights))
            entry["weights"] = len(keras_model.weights)
        described.append(entry)
    weights_hex = weights_digest.hexdigest()
    digest.update(weights_hex.encode())
    readable = {"calculator": name, "configuration": json.loads(canonical), "models": described,
                "weights_sha256": weights_hex}
    return digest.hexdigest(), readable
