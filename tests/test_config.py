from pathlib import Path

import pytest

from conftest import ROOT
from gpt2.cli import build_parser, parse_args
from gpt2.config import ConfigError, config_defaults, config_to_argv, read_config


def write(tmp_path, text):
    path = tmp_path / ".config"
    path.write_text(text)
    return path


def test_types_map_from_config(tmp_path):
    cfg = write(tmp_path, "\n".join([
        "CONFIG_KVSPLICE_K=16",                 # int
        "CONFIG_KVSPLICE_ENABLE=y",             # bool
        "# CONFIG_BIAS is not set",             # bool n
        'CONFIG_LEARNING_RATE="6e-4"',          # float, written as a Kconfig string
        'CONFIG_DATASET="file:/tmp/some text.txt"',  # string
        'CONFIG_KVSPLICE_CALIB_ITER=""',        # empty optional -> None
    ]))
    args = parse_args(["--config", str(cfg)])
    assert args.kvsplice_k == 16 and args.kvsplice_enable is True and args.bias is False
    assert args.learning_rate == 6e-4 and args.dataset == "file:/tmp/some text.txt"
    assert args.kvsplice_calib_iter is None


def test_command_line_overrides_config(tmp_path):
    cfg = write(tmp_path, "CONFIG_KVSPLICE_K=16\nCONFIG_KVSPLICE_ENABLE=y\nCONFIG_N_LAYER=4\n")
    args = parse_args(["--config", str(cfg), "--kvsplice-k", "8", "--no-kvsplice-enable"])
    assert args.kvsplice_k == 8 and args.kvsplice_enable is False and args.n_layer == 4


def test_ablation_step_overrides_config_and_command_line_overrides_step(tmp_path):
    cfg = write(tmp_path, "CONFIG_KV_PRUNE=y\nCONFIG_KVSPLICE_K=32\n")
    args = parse_args(["--config", str(cfg), "--ablation-step", "V0"])
    assert args.kv_prune is False  # V0 switches pruning off whatever .config says
    args = parse_args(["--config", str(cfg), "--ablation-step", "V20"])
    assert args.kv_prune and args.kvsplice_enable and args.kvsplice_k == 16
    args = parse_args(["--config", str(cfg), "--ablation-step", "V20", "--kvsplice-k", "8"])
    assert args.kvsplice_k == 8


def test_unknown_symbol_is_an_error_naming_it(tmp_path, capsys):
    cfg = write(tmp_path, "CONFIG_KVSPLICE_KAY=16\n")
    with pytest.raises(ConfigError, match="CONFIG_KVSPLICE_KAY has no matching flag --kvsplice-kay"):
        config_defaults(build_parser(), read_config(cfg))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(cfg)])
    assert "CONFIG_KVSPLICE_KAY" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ("CONFIG_KVSPLICE_K=sixteen", "expects int"),
    ('CONFIG_LEARNING_RATE="fast"', "expects float"),
    ("CONFIG_KVSPLICE_ENABLE=maybe", "expected y or n"),
    ('CONFIG_TRACKER="mlflow"', "must be one of"),
])
def test_wrong_type_is_an_error_naming_the_symbol(tmp_path, line, message):
    cfg = write(tmp_path, line + "\n")
    with pytest.raises(ConfigError, match=message) as e:
        config_defaults(build_parser(), read_config(cfg))
    assert line.split("=")[0] in str(e.value)


def test_missing_config_says_to_run_defconfig(tmp_path):
    with pytest.raises(ConfigError, match="make defconfig"):
        read_config(tmp_path / ".config")


def test_config_to_argv_round_trips(tmp_path):
    cfg = write(tmp_path, "CONFIG_KVSPLICE_K=16\n# CONFIG_BIAS is not set\nCONFIG_RMLP=y\n")
    argv = config_to_argv(cfg, build_parser())
    assert argv == ["--kvsplice-k", "16", "--no-bias", "--rmlp"]


def test_kconfig_is_generated_from_the_flags():
    from gpt2.kconfig_gen import kconfig_text

    assert (ROOT / "Kconfig").read_text() == kconfig_text(), "Kconfig is stale: run `make kconfig`"


def test_every_flag_has_help_and_every_kconfig_symbol_maps_to_a_flag():
    import kconfiglib

    parser = build_parser()
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]
    kconf = kconfiglib.Kconfig(str(ROOT / "Kconfig"), warn=False)
    symbols = {f"CONFIG_{s.name}": s.str_value for s in kconf.unique_defined_syms}
    assert len(symbols) > 40
    config_defaults(parser, {k: v for k, v in symbols.items()})  # raises on any unmapped symbol


@pytest.mark.parametrize("defconfig", sorted(p.name for p in (ROOT / "defconfigs").iterdir()))
def test_every_defconfig_loads(defconfig, tmp_path, monkeypatch):
    import kconfiglib

    monkeypatch.chdir(ROOT)
    kconf = kconfiglib.Kconfig("Kconfig", warn_to_stderr=False)
    kconf.load_config(str(ROOT / "defconfigs" / defconfig))
    assert not kconf.warnings, kconf.warnings  # every symbol in the defconfig exists, values valid
    out = tmp_path / ".config"
    kconf.write_config(str(out))
    args = parse_args(["--config", str(out)])
    assert args.out_dir == f"runs/{defconfig}"


@pytest.mark.parametrize("defconfig", sorted(p.name for p in (ROOT / "defconfigs").iterdir()))
def test_every_defconfig_is_minimal(defconfig, tmp_path, monkeypatch):
    """What `make savedefconfig` would write: no line that repeats a default."""
    import kconfiglib

    monkeypatch.chdir(ROOT)
    kconf = kconfiglib.Kconfig("Kconfig", warn_to_stderr=False)
    kconf.load_config(str(ROOT / "defconfigs" / defconfig))
    kconf.write_min_config(str(tmp_path / "min"))
    lines = lambda p: {l for l in Path(p).read_text().splitlines() if l and not l.startswith("#")}
    assert lines(ROOT / "defconfigs" / defconfig) == lines(tmp_path / "min")
