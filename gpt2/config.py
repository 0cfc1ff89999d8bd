""".config <-> argparse, in one place.

A Kconfig symbol CONFIG_FOO_BAR is the default of the flag --foo-bar: the
name is the whole mapping, so there is no table to keep in sync. Types come
from the flag: a boolean flag takes y/n, an int or float flag a number (Kconfig
has no float type, so floats are written as strings: "6e-4"), a string flag
a string. Precedence, lowest first: the flag's default, .config, the
--ablation-step row (gpt2/ablations.py), the command line.
"""

import argparse
import re
from pathlib import Path

_LINE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


class ConfigError(ValueError):
    pass


def read_config(path):
    """Parse a .config into {SYMBOL: raw value} (strings unquoted, 'n' for unset)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run `make defconfig` (or `make defconfig-NAME`) first")
    values = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if m := _UNSET.match(line):
            values[m.group(1)] = "n"
        elif m := _LINE.match(line):
            raw = m.group(2)
            if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                raw = raw[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            values[m.group(1)] = raw
        elif line and not line.startswith("#"):
            raise ConfigError(f"{path}:{lineno}: cannot parse line {line!r}")
    return values


def _flag_actions(parser):
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def symbol_to_dest(symbol):
    return symbol[len("CONFIG_"):].lower()


def dest_to_symbol(dest):
    return "CONFIG_" + dest.upper()


def _convert(symbol, raw, action):
    flag = action.option_strings[0]
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        if raw not in ("y", "n"):
            raise ConfigError(f"{symbol}: {flag} is a boolean, expected y or n, found {raw!r}")
        return raw == "y"
    if raw == "" and action.default is None:
        return None
    if action.type in (int, float):
        try:
            value = action.type(raw)
        except ValueError:
            raise ConfigError(f"{symbol}: {flag} expects {action.type.__name__}, found {raw!r}") from None
    else:
        value = raw
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{symbol}: {flag} must be one of {list(action.choices)}, found {raw!r}")
    return value


def config_defaults(parser, values):
    """Map {CONFIG_SYMBOL: raw} to {dest: typed value}; unknown symbol -> ConfigError."""
    actions = _flag_actions(parser)
    out = {}
    for symbol, raw in values.items():
        dest = symbol_to_dest(symbol)
        if dest not in actions:
            raise ConfigError(f"{symbol} has no matching flag --{dest.replace('_', '-')} in gpt2/cli.py")
        out[dest] = _convert(symbol, raw, actions[dest])
    return out


def config_to_argv(path, parser):
    """The .config as command-line flags (for runners that start subprocesses)."""
    actions = _flag_actions(parser)
    argv = []
    for dest, value in config_defaults(parser, read_config(path)).items():
        flag = actions[dest].option_strings[0]
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def parse_with_config(parser, argv=None, step_overrides=None):
    """Parse argv with defaults taken from --config and --ablation-step.

    step_overrides(step, known_dests) -> {dest: value} is the ablation table's
    lookup (gpt2.ablations.step_overrides), passed in so that lib/ never
    imports gpt2/."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--ablation-step")
    early, _ = pre.parse_known_args(argv)
    try:
        if early.config:
            parser.set_defaults(**config_defaults(parser, read_config(early.config)))
        step = early.ablation_step or parser.get_default("ablation_step")
        if step:
            if step_overrides is None:
                raise ConfigError(f"--ablation-step {step}: no ablation table given to parse_with_config")
            parser.set_defaults(**step_overrides(step, _flag_actions(parser)))
    except (ConfigError, KeyError) as e:
        parser.error(str(e.args[0] if isinstance(e, KeyError) else e))
    return parser.parse_args(argv)


# Flags that make no sense in a .config: per-invocation switches.
NOT_IN_KCONFIG = {"config", "resume", "list_steps", "ablation_step"}


def _kconfig_type(action):
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        return "bool"
    if action.type is int and action.default is not None:
        return "int"
    return "string"  # strings, floats (Kconfig has no float type), optional ints


def _kconfig_default(action, kind):
    if kind == "bool":
        return "y" if action.default else "n"
    if kind == "int":
        return str(action.default)
    text = "" if action.default is None else str(action.default)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_kconfig(parser, header):
    """The Kconfig text for every flag: one menu per argument group, the
    flag's help as the symbol's help. Kconfig is generated, never edited."""
    lines = [header.rstrip(), ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.option_strings and a.dest not in NOT_IN_KCONFIG and a.dest != "help"]
        if not actions:
            continue
        lines.append(f'menu "{group.title[0].upper() + group.title[1:]}"')
        lines.append("")
        for a in actions:
            kind = _kconfig_type(a)
            flag = a.option_strings[0]
            lines.append(f"config {dest_to_symbol(a.dest)[len('CONFIG_'):]}")
            lines.append(f'\t{kind} "{flag}"')
            lines.append(f"\tdefault {_kconfig_default(a, kind)}")
            lines.append("\thelp")
            help_text = (a.help or "").replace("%(default)s", str(a.default))
            if a.choices:
                help_text += f" (one of: {', '.join(map(str, a.choices))})"
            if a.type is float:
                help_text += " (a number, written as a string)"
            lines.append(f"\t  {help_text} [{flag}]")
            lines.append("")
        lines.append("endmenu")
        lines.append("")
    return "\n".join(lines)
