"""The KVSplice geometry file: kvsplice.pt, and the "kvsplice" entry of a checkpoint.

    {"Hd", "k", "knots", "n_layer", "shared", "state_dict", "format_version", "fit_stats"}

with state_dict a list of SplinePCA state dicts: one per layer, or one
shared by all layers. gpt2/calibrate.py writes it; the model reads it.
"""

import torch

from lib.kvsplice import FORMAT_VERSION as SPLINEPCA_FORMAT
from lib.kvsplice import SplinePCA
from gpt2.atomic import atomic_torch_save

GEOMETRY_FORMAT = 1
_KEYS = ("Hd", "k", "knots", "n_layer", "shared", "state_dict", "format_version")


def save_geometry(geometry, path):
    atomic_torch_save(geometry, path)
    print(f"[KVSplice] Saved to {path}")


def check_geometry(geometry, config, where, expected_k=None):
    """Raise ValueError naming expected and found values when a geometry does not fit a model."""
    if not isinstance(geometry, dict) or any(key not in geometry for key in _KEYS):
        missing = [key for key in _KEYS if not isinstance(geometry, dict) or key not in geometry]
        raise ValueError(f"{where} is not a KVSplice geometry: missing keys {missing}")
    if geometry["format_version"] != GEOMETRY_FORMAT:
        raise ValueError(f"{where}: format_version {geometry['format_version']!r}, expected {GEOMETRY_FORMAT}")
    head_dim = config.n_embd // config.n_head
    for key, expected in (("Hd", head_dim), ("n_layer", config.n_layer), ("k", expected_k)):
        if expected is not None and geometry[key] != expected:
            raise ValueError(f"{where}: {key} is {geometry[key]}, but the model needs {key} = {expected}")
    n_sd = 1 if geometry["shared"] else geometry["n_layer"]
    if len(geometry["state_dict"]) != n_sd:
        raise ValueError(f"{where}: {len(geometry['state_dict'])} state dicts, expected {n_sd}")


def load_geometry(path, config, expected_k=None):
    """Read a kvsplice.pt for `config` (a GPTConfig); clear errors for bad files."""
    try:
        geometry = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"KVSplice geometry {path} not found") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable KVSplice geometry file ({type(e).__name__}: {e})") from None
    check_geometry(geometry, config, str(path), expected_k)
    return geometry


def geometry_modules(geometry, config):
    """One frozen SplinePCA per layer (the same object everywhere when shared)."""
    check_geometry(geometry, config, "KVSplice geometry")
    mods = [SplinePCA.from_dict({"Hd": geometry["Hd"], "k": geometry["k"], "knots": geometry["knots"],
                                 "state_dict": sd, "format_version": SPLINEPCA_FORMAT})
            for sd in geometry["state_dict"]]
    if geometry["shared"]:
        mods = mods * config.n_layer
    return mods
