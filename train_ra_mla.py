#!/usr/bin/env python3
"""Train GPT-2 with a V-cache method in attention: V-only KV pruning, KVSplice
compression, or any registered method (--v-cache).

Single process:   python train_ra_mla.py --config .config [--flag value ...]
Several GPUs:     torchrun --nproc_per_node=N train_ra_mla.py --config .config

Every flag is declared once, in gpt2/cli.py. A Kconfig symbol CONFIG_FOO_BAR
sets the default of --foo-bar (gpt2/config.py); an --ablation-step applies its
row of gpt2/ablations.py; a flag on the command line overrides both.
"""

from gpt2.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
