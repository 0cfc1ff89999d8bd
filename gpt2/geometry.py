"""The fitted-codec file, kvsplice.pt: every layer's fitted V codec state, as
the calibrator saved it, for --kvsplice-load to reuse in another run.

    {"format_version": 2, "codec": the codec's record, "head_dim", "n_layer",
     "state_dict": [one codec state_dict per layer], "fit_stats"}

Files of format 1 (a KVSplice geometry: one SplinePCA state per layer, or one
shared) still load into a splinepca or pca codec with their k and knots.
"""

import torch

from gpt2.atomic import atomic_torch_save
from lib.vcache import describe, describe_part

FORMAT = 2
LEGACY_FORMAT = 1
_KEYS = ("codec", "head_dim", "n_layer", "state_dict")
_LEGACY_KEYS = ("Hd", "k", "knots", "n_layer", "shared", "state_dict")


def fitted_state(model, fit_stats=None):
    """The file's dict for a model whose codecs were fitted."""
    return {"format_version": FORMAT, "codec": model.config.v_cache["codec"], "head_dim": model.config.head_dim,
            "n_layer": model.config.n_layer, "fit_stats": fit_stats,
            "state_dict": [{n: t.detach().cpu() for n, t in codec.state_dict().items()}
                           for codec in model.v_codecs()]}


def save_fitted(model, path, fit_stats=None):
    atomic_torch_save(fitted_state(model, fit_stats), path)
    print(f"[KVSplice] Saved to {path}")


def _layer_states(saved, config, where):
    """One codec state_dict per layer from a file's dict; ValueError naming expected and found."""
    if not isinstance(saved, dict) or saved.get("format_version") not in (FORMAT, LEGACY_FORMAT):
        found = saved.get("format_version") if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"{where} is not a fitted V codec file: format_version {found!r}, "
                         f"expected {FORMAT} (or {LEGACY_FORMAT}, a KVSplice geometry)")
    legacy = saved["format_version"] == LEGACY_FORMAT
    missing = [key for key in (_LEGACY_KEYS if legacy else _KEYS) if key not in saved]
    if missing:
        raise ValueError(f"{where} is not a fitted V codec file: missing keys {missing}")
    codec = config.v_cache["codec"]
    if legacy:
        found = {"head_dim": saved["Hd"], "n_layer": saved["n_layer"], "k": saved["k"], "knots": saved["knots"]}
        expected = {"head_dim": config.head_dim, "n_layer": config.n_layer,
                    "k": codec.get("k"), "knots": codec.get("knots")}
        if codec["kind"] not in ("splinepca", "pca"):
            raise ValueError(f"{where} holds a KVSplice geometry, but the model's V codec is "
                             f"{describe(config.v_cache)}: a splinepca or pca codec loads it")
    else:
        found = {"head_dim": saved["head_dim"], "n_layer": saved["n_layer"], "codec": describe_part(saved["codec"])}
        expected = {"head_dim": config.head_dim, "n_layer": config.n_layer, "codec": describe_part(codec)}
    for key, value in expected.items():
        if found[key] != value:
            raise ValueError(f"{where}: {key} is {found[key]}, but the model needs {key} = {value}")
    states = saved["state_dict"]
    n = 1 if legacy and saved["shared"] else config.n_layer
    if not isinstance(states, list) or len(states) != n:
        raise ValueError(f"{where}: {len(states) if isinstance(states, list) else 'no'} state dicts, expected {n}")
    if legacy:
        states = [{**{"geometry." + name: t for name, t in sd.items()}, "fit_done": torch.tensor(True)}
                  for sd in states * (config.n_layer // n)]
    return states


def load_fitted(path, model):
    """Load a kvsplice.pt into the model's codecs; clear errors for a bad or unfitting file."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"fitted V codec file {path} not found") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable KVSplice geometry file ({type(e).__name__}: {e})") from None
    for i, (codec, state) in enumerate(zip(model.v_codecs(), _layer_states(saved, model.config, str(path)))):
        try:
            codec.load_state_dict(state)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{path}: layer {i}'s state does not fit the model's codec: {e}") from None
