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
from lib.codecs.geometry import GeometryCodec
from lib.vcache import describe, describe_part

FORMAT = 3
READABLE = (1, 2, 3)
_KEYS = ("codec", "head_dim", "n_layer", "state_dict")
_GEOMETRY_KEYS = ("Hd", "k", "knots", "state_dict")


def fitted_state(model, fit_stats=None):
    """The file's dict for a model whose codecs were fitted."""
    cfg, record, codecs = model.config, model.config.v_cache["codec"], model.v_codecs()
    saved = {"format_version": FORMAT, "codec": record, "head_dim": cfg.head_dim, "n_layer": cfg.n_layer,
             "fit_stats": fit_stats, "state_dict": [_cpu(c.state_dict()) for c in codecs]}
    if isinstance(codecs[0], GeometryCodec):  # the seed's keys: a SplinePCA state_dict per layer
        saved.update(Hd=cfg.head_dim, k=record["k"], knots=record["knots"], shared=False,
                     state_dict=[_cpu(c.geometry.state_dict()) for c in codecs])
    return saved


def _cpu(state):
    return {n: t.detach().cpu() for n, t in state.items()}


def save_fitted(model, path, fit_stats=None):
    atomic_torch_save(fitted_state(model, fit_stats), path)
    LOG.info(f"Saved to {path}")


def _geometry_states(saved, model, where):
    """One SplinePCA state_dict per layer from a file in the seed's geometry shape."""
    missing = [key for key in _GEOMETRY_KEYS if key not in saved]
    if missing:
        raise ValueError(f"{where} is not a KVSplice geometry file: missing keys {missing}")
    config, codec = model.config, model.config.v_cache["codec"]
    if not isinstance(model.v_codecs()[0], GeometryCodec):
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
    return _per_layer(states, config.n_layer, where)


def _per_layer(states, n_layer, where):
    if not isinstance(states, list) or len(states) != n_layer:
        raise ValueError(f"{where}: {len(states) if isinstance(states, list) else 'no'} state dicts, "
                         f"expected {n_layer}")
    return states


def _check(found, expected, where):
    for key, value in expected.items():
        if found[key] != value:
            raise ValueError(f"{where}: {key} is {found[key]}, but the model needs {key} = {value}")


def _codec_states(saved, config, where):
    """One codec state_dict per layer from a file of the codecs' own states (format 2 or 3)."""
    version = saved.get("format_version")
    if version not in READABLE:
        raise ValueError(f"{where} is not a fitted V codec file: format_version {version!r}, expected one of "
                         f"{list(READABLE)} or the seed's KVSplice geometry ({', '.join(_GEOMETRY_KEYS)})")
    missing = [key for key in _KEYS if key not in saved]
    if missing:
        raise ValueError(f"{where} is not a fitted V codec file: missing keys {missing}")
    _check({"head_dim": saved["head_dim"], "n_layer": saved["n_layer"], "codec": describe_part(saved["codec"])},
           {"head_dim": config.head_dim, "n_layer": config.n_layer,
            "codec": describe_part(config.v_cache["codec"])}, where)
    return _per_layer(saved["state_dict"], config.n_layer, where)


def load_fitted(path, model):
    """Load a kvsplice.pt into the model's codecs; clear errors for a bad or unfitting file."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"fitted V codec file {path} not found") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable KVSplice geometry file ({type(e).__name__}: {e})") from None
    where = str(path)
    if not isinstance(saved, dict):
        raise ValueError(f"{where} is not a fitted V codec file: found a {type(saved).__name__}, expected a dict")
    # the seed's shape: format 1 or 3 with Hd, or the seed's one SplinePCA state_dict
    geometry = "Hd" in saved and (saved.get("format_version") in (1, FORMAT)
                                  or isinstance(saved.get("state_dict"), dict))
    states = _geometry_states(saved, model, where) if geometry else _codec_states(saved, model.config, where)
    for i, (codec, state) in enumerate(zip(model.v_codecs(), states)):
        try:
            if geometry:
                codec.load_geometry(state)
            else:
                codec.load_state_dict(state)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{path}: layer {i}'s state does not fit the model's codec: {e}") from None
