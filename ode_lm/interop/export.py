"""Parameter export: a time-indexed model as named float64 arrays in one ``.npz`` file.

The file is what the float64 reference backend and the Julia project read, so its format is
a contract (documented in docs/interop.md):

- one ``.npy`` member per parameter array, named by its path in the model with the vector
  field's prefix dropped: ``embedding.tokens``, ``block.attn.qkv.weight``,
  ``modulation.out.bias``, ``readout.norm.weight``, ...; ``readout.head`` only when the
  embeddings are untied;
- every array is float64, little-endian, C order (row-major, ``fortran_order: False``),
  with the shape it has in Python (a ``Linear`` weight is ``[fan_in, fan_out]``: ``y = x W``);
- ``config.*`` members hold the hyperparameters the maths needs, as one-element arrays
  (int64 or float64) so that any ``.npy`` reader, NPZ.jl included, reads them.

Julia is column-major. The rule (what NPZ.jl does, and what ``julia_view`` checks from
Python): read the raw buffer into an array of the *reversed* shape, then reverse the axes
(``permutedims(A, ndims(A):-1:1)``); index ``[i, j, ...]`` in Julia is then ``[i-1, j-1, ...]``
in Python.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

from ode_lm.errors import UserError
from ode_lm.models import ODELanguageModel, TimeIndexedField

FORMAT_VERSION = 1


class ExportError(UserError):
    """A model that cannot be exported, or an export file that cannot be read back."""


@dataclass(frozen=True)
class ExportedModel:
    """What an export file holds: parameter arrays by name and the hyperparameters."""

    params: dict[str, np.ndarray]
    heads: int
    mlp_ratio: int
    time_embed_dim: int
    layer_norm_eps: float
    max_frequency: float

    @property
    def tied(self) -> bool:
        return "readout.head" not in self.params

    def config_arrays(self) -> dict[str, np.ndarray]:
        return {"config.format_version": np.array([FORMAT_VERSION], np.int64),
                "config.heads": np.array([self.heads], np.int64),
                "config.mlp_ratio": np.array([self.mlp_ratio], np.int64),
                "config.time_embed_dim": np.array([self.time_embed_dim], np.int64),
                "config.layer_norm_eps": np.array([self.layer_norm_eps], np.float64),
                "config.max_frequency": np.array([self.max_frequency], np.float64)}


def _key_name(entry) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    raise ExportError(f"cannot name the parameter path entry {entry!r}")


def export_model(model: ODELanguageModel) -> ExportedModel:
    """The float64 named arrays of a time-indexed model (any parameter dtype)."""
    field = getattr(model, "field", None)
    # The constant family is a TimeIndexedField too, but its modulation does not read sinusoidal(t).
    if (not isinstance(model, ODELanguageModel) or not isinstance(field, TimeIndexedField)
            or field.constant is not None):
        raise ExportError(f"export supports the time_indexed family only, got {type(model).__name__}"
                          f" with field {type(field).__name__}"
                          + (" (the constant family)" if getattr(field, "constant", None) is not None else ""))
    if field.block.attn.qkv.bias is None:
        raise ExportError("export and the reference backends implement the model with biases; "
                          "this one has model.bias = false")
    params = {}
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_inexact_array))[0]
    for path, leaf in leaves:
        names = [_key_name(p) for p in path]
        if names[0] == "field":
            names = names[1:]
        params[".".join(names)] = np.asarray(leaf, dtype=np.float64)
    field = model.field
    return ExportedModel(params, field.block.attn.heads, field.mlp_ratio, field.time_embed_dim,
                         float(field.block.ln_attn.eps), float(field.time_max_frequency))


def save_export(exported: ExportedModel, path: str | Path) -> Path:
    """Write ``exported`` as an uncompressed ``.npz`` (row-major float64 arrays)."""
    path = Path(path)
    arrays = {name: np.ascontiguousarray(a, dtype="<f8") for name, a in exported.params.items()}
    np.savez(path, **arrays, **exported.config_arrays())
    return path


def load_export(path: str | Path) -> ExportedModel:
    """Read an export file back, checking its format version and config members."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ExportError(f"{path}: not a readable ode-lm export (.npz): {e}") from None
    need = ("config.format_version", "config.heads", "config.mlp_ratio", "config.time_embed_dim",
            "config.layer_norm_eps", "config.max_frequency")
    missing = [n for n in need if n not in arrays]
    if missing:
        raise ExportError(f"{path}: missing {', '.join(missing)}; write it with ode_lm.interop.save_export")
    version = int(arrays["config.format_version"][0])
    if version != FORMAT_VERSION:
        raise ExportError(f"{path}: export format version {version}; this ode-lm reads version {FORMAT_VERSION}")
    params = {n: a for n, a in arrays.items() if not n.startswith("config.")}
    return ExportedModel(params, int(arrays["config.heads"][0]), int(arrays["config.mlp_ratio"][0]),
                         int(arrays["config.time_embed_dim"][0]), float(arrays["config.layer_norm_eps"][0]),
                         float(arrays["config.max_frequency"][0]))


def julia_view(path: str | Path) -> dict[str, np.ndarray]:
    """Every member of an export file read by the documented column-major rule.

    For each ``.npy`` member: take the raw data buffer, fill an array of the *reversed* shape
    in column-major (Fortran) order, as Julia's ``reshape`` does, then reverse the axes. The
    result must equal what Python wrote; the tests check that it does.
    """
    out = {}
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            with z.open(member) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran_order, dtype = read_header(f)
                if fortran_order:
                    raise ExportError(f"{path}:{member} is stored in Fortran order; exports are row-major")
                raw = np.frombuffer(f.read(), dtype=dtype)
            reversed_shape = tuple(reversed(shape))
            column_major = raw.reshape(reversed_shape, order="F")
            out[member.removesuffix(".npy")] = column_major.transpose(tuple(reversed(range(len(shape)))))
    return out
