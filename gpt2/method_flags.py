"""The flags that choose a run's V-cache method, as one lib.vcache record.

--v-cache RECORD (JSON) names any registered method, e.g.
    '{"select": {"kind": "prune"}, "codec": {"kind": "int4"}}'
Without it the seed's switches build one: --kv-prune gives the prune
selector, --kvsplice-enable (or --kvsplice-load) the splinepca codec.
Either way, a setting the record leaves out comes from the seed's flags:
prune and random from --kv-prune-keep-ratio, --kv-prune-k-min and
--kv-prune-recency; pca and splinepca from --kvsplice-k and --kvsplice-knots.
Those flags' defaults are the methods' own (gpt2/cli.py reads them from
the classes), so a record that names no setting gets the defaults.
"""

import json
import re

from lib.settings import BadSettings
from lib.vcache import CODECS

FLAG_SETTINGS = {  # kind -> {setting: the flag (argparse dest) that gives it}
    "prune": {"keep_ratio": "kv_prune_keep_ratio", "k_min": "kv_prune_k_min", "recency": "kv_prune_recency"},
    "pca": {"k": "kvsplice_k", "knots": "kvsplice_knots"},
}
FLAG_SETTINGS["random"] = FLAG_SETTINGS["prune"]
FLAG_SETTINGS["splinepca"] = FLAG_SETTINGS["pca"]


def flag(dest):
    return "--" + dest.replace("_", "-")


def _given_record(text):
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadSettings([f"--v-cache is not a JSON record ({e}): {text!r}"]) from None
    parts_ok = isinstance(record, dict) and set(record) == {"select", "codec"} and all(
        isinstance(record[part], dict) and "kind" in record[part] for part in record)
    if not parts_ok:
        raise BadSettings([f'--v-cache: expected {{"select": {{"kind": ...}}, "codec": {{"kind": ...}}}}, '
                           f"found {text!r}"])
    return record


def v_cache_record(args):
    """The record of the method the flags ask for, and {part: {setting: dest}}
    for the settings that came from the seed's flags. BadSettings for a
    --v-cache that is not a record."""
    if args.v_cache:
        record = _given_record(args.v_cache)
    else:
        record = {"select": {"kind": "prune" if args.kv_prune else "full"},
                  "codec": {"kind": "splinepca" if args.kvsplice_enable or args.kvsplice_load else "none"}}
    filled = {}
    for part, spec in record.items():
        from_flags = {n: dest for n, dest in FLAG_SETTINGS.get(spec["kind"], {}).items() if n not in spec}
        spec.update({n: getattr(args, dest) for n, dest in from_flags.items()})
        filled[part] = from_flags
    return record, filled


def method_record(args):
    """v_cache_record's record alone."""
    return v_cache_record(args)[0]


def flag_problem(problem, filled, given):
    """A build_method problem in the words of the flags that set it: a setting
    that came from a seed flag is named by that flag; without --v-cache the
    record's own wording goes."""
    match = re.match(r"v_cache (select|codec) '[^']*': ", problem)
    if match is None:
        return ("--v-cache: " if given else "") + problem
    text = problem[match.end():]
    for setting, dest in filled.get(match.group(1), {}).items():
        text = re.sub(rf"\b{setting}\b", flag(dest), text)
    return f"--v-cache: {match.group(0)}{text}" if given else text


def method_needs_fit(args):
    """Whether the run calibrates: its codec has a fit step and --kvsplice-load gives it none."""
    return not args.kvsplice_load and CODECS[method_record(args)["codec"]["kind"]].needs_fit
