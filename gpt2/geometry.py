"""The fitted-codec file, kvsplice.pt: every layer's fitted V codec state, as
the calibrator saved it, for --kvsplice-load to reuse in another run.

    {"format_version": 3, "codec": the codec's record, "head_dim", "n_layer",
     "state_dict": [one codec state_dict per layer], "fit_stats"}

A KVSplice geometry (a pca or splinepca codec) is saved in the seed's shape
beside the record: "Hd", "k", "knots", "shared", and "state_dict" as one
SplinePCA state_dict per layer, so `SplinePCA(d["Hd"], d["k"],
d["knots"]).load_state_dict(d["state_dict"][i])` reads layer i.

These load as well:
    format 2   the codec's own state_dicts (geometry.* keys and fit_done)
    format 1   a geometry: "Hd", "k", "knots", "n_layer", "shared", "state_dict" (a list)
    the seed's {"Hd", "k", "knots", "state_dict"} with one SplinePCA
               state_dict: one geometry for every layer
"""

import torch

from gpt2.atomic import atomic_torch_save
from gpt2.calibrate import LOG
from lib.vcache import describe, describe_part

FORMAT = 3
READABLE = (1, 2, 3)
GEOMETRY_CODECS = ("splinepca", "pca")
_KEYS = ("codec", "head_dim", "n_layer", "state_dict")
_GEOMETRY_KEYS = ("Hd", "k", "knots", "state_dict")
_PREFIX = "geometry."  # a geometry codec's SplinePCA is its `geometry` submodule


def fitted_state(model, fit_stats=None):
    """The file's dict for a model whose codecs were fitted."""
    cfg, codec = model.config, model.config.v_cache["codec"]
    states = [{n: t.detach().cpu() for n, t in c.state_dict().items()} for c in model.v_codecs()]
    saved = {"format_version": FORMAT, "codec": codec, "head_dim": cfg.head_dim, "n_layer": cfg.n_layer,
             "fit_stats": fit_stats, "state_dict": states}
    if codec["kind"] in GEOMETRY_CODECS:  # the seed's keys: a SplinePCA state_dict per layer
        saved.update(Hd=cfg.head_dim, k=codec["k"], knots=codec["knots"], shared=False,
                     state_dict=[{n[len(_PREFIX):]: t for n, t in sd.items() if n.startswith(_PREFIX)}
                                 for sd in states])
    return saved


def save_fitted(model, path, fit_stats=None):
    atomic_torch_save(fitted_state(model, fit_stats), path)
    LOG.info(f"Saved to {path}")


def _geometry_states(saved, config, where):
    """Codec state_dicts per layer from a file in the seed's geometry shape."""
    missing = [key for key in _GEOMETRY_KEYS if key not in saved]
    if missing:
        raise ValueError(f"{where} is not a KVSplice geometry file: missing keys {missing}")
    codec = config.v_cache["codec"]
    if codec["kind"] not in GEOMETRY_CODECS:
        raise ValueError(f"{where} holds a KVSplice geometry, but the model's V codec is "
                         f"{describe(config.v_cache)}: a splinepca or pca codec loads it")
    states = saved["state_dict"]
    if isinstance(states, dict):  # the seed's file: one geometry for every layer
        states = [states] * config.n_layer
    elif isinstance(states, list) and saved.get("shared") and len(states) == 1:
        states = states * config.n_layer
    found = {"head_dim": saved["Hd"], "k": saved["k"], "knots": saved["knots"],
             "n_layer": saved.get("n_layer", config.n_layer)}
    expected = {"head_dim": config.head_dim, "k": codec["k"], "knots": codec["knots"], "n_layer": config.n_layer}
    if "codec" in saved:
        found["codec"], expected["codec"] = describe_part(saved["codec"]), describe_part(codec)
    _check(found, expected, where)
    if not isinstance(states, list) or len(states) != config.n_layer:
        raise ValueError(f"{where}: {len(states) if isinstance(states, list) else 'no'} state dicts, "
                         f"expected {config.n_layer}")
    return [{**{_PREFIX + n: t for n, t in sd.items()}, "fit_done": torch.tensor(True)} for sd in states]


def _check(found, expected, where):
    for key, value in expected.items():
        if found[key] != value:
            raise ValueError(f"{where}: {key} is {found[key]}, but the model needs {key} = {value}")


def _layer_states(saved, config, where):
    """One codec state_dict per layer from a file's dict; ValueError naming expected and found."""
    if not isinstance(saved, dict):
        raise ValueError(f"{where} is not a fitted V codec file: found a {type(saved).__name__}, expected a dict")
    version = saved.get("format_version")
    if "Hd" in saved and (version in (1, FORMAT) or isinstance(saved.get("state_dict"), dict)):
        return _geometry_states(saved, config, where)
    if version not in READABLE:
        raise ValueError(f"{where} is not a fitted V codec file: format_version {version!r}, expected one of "
                         f"{list(READABLE)} or the seed's KVSplice geometry ({', '.join(_GEOMETRY_KEYS)})")
    missing = [key for key in _KEYS if key not in saved]
    if missing:
        raise ValueError(f"{where} is not a fitted V codec file: missing keys {missing}")
    _check({"head_dim": saved["head_dim"], "n_layer": saved["n_layer"], "codec": describe_part(saved["codec"])},
           {"head_dim": config.head_dim, "n_layer": config.n_layer,
            "codec": describe_part(config.v_cache["codec"])}, where)
    states = saved["state_dict"]
    if not isinstance(states, list) or len(states) != config.n_layer:
        raise ValueError(f"{where}: {len(states) if isinstance(states, list) else 'no'} state dicts, "
                         f"expected {config.n_layer}")
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
