"""Generate text through a V-cache method, from one command.

    python -m gpt2.generate --model smollm2 --prompt "To be, or not to be"
    python -m gpt2.generate --model smollm2 --ablation-step V24 --prompt-file prompt.txt --max-new-tokens 200
    python -m gpt2.generate --model runs/cpu-quickstart/V20/best.pt --prompt "ROMEO:" --temperature 0
    make generate ARGS='--model smollm2 --v-cache RECORD --chat --prompt "..."'

--model is `smollm2` (the embedded SmolLM2-135M), a local Hugging Face
directory (GPT-2, Llama, Qwen2, Mistral) or a training checkpoint. The
method is a checkpoint's own unless --v-cache (a lib.vcache record) or
--ablation-step (a row of gpt2/ablations.py) names another. A method whose
codec needs a fit is fitted first, on V from the embedded plays in the
model's tokenizer (a checkpoint's own training data) or from --fit-file,
with a progress line; the fit is saved under --fit-dir and reused by the
next run of the same model, method, fit text and seed.

The prompt is printed as the model reads it (in its chat template with
--chat), then the new text as it is drawn. The last line gives the prefill's and the
decode's tokens/s, and the KV cache's memory measured from its own tensors
after the prompt and at the end (keys, V with its codes' scales, the index
of a selector that keeps some tokens), beside what the plain cache (every
key and V as it came) holds for the same tokens.
"""

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from gpt2.ablations import STEPS
from gpt2.atomic import atomic_torch_save
from gpt2.calibrate import MAX_SAMPLES, calibration_batches, fit_codecs, quiet
from gpt2.cli import parse_args as train_flags
from gpt2.data import TokenData, dataset_dir_name, open_data
from gpt2.entry import ArgumentParser, run
from gpt2.lm import load_checkpoint
from gpt2.method_flags import method_record
from gpt2.prepare_data import decode_tokens, encode_text, prepare
from gpt2.pretrained import SMOLLM2, load_pretrained, load_tokenizer, model_from_checkpoint, source_family
from gpt2.tokenizer import get_tokenizer
from lib.settings import BadSettings
from lib.vcache import describe

FIT_CORPUS = "shakespeare-raw"  # the embedded plays, prepared with a pretrained model's own tokenizer
FIT_BATCHES = 8


def parse_args(argv):
    ap = ArgumentParser(prog="python -m gpt2.generate", description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", required=True, help="smollm2, a Hugging Face directory, or a training checkpoint")
    method = ap.add_mutually_exclusive_group()
    method.add_argument("--v-cache", help="the V-cache method, a lib.vcache record (JSON)")
    method.add_argument("--ablation-step", help="the V-cache method of an ablation step (gpt2/ablations.py)")
    prompt = ap.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--prompt-file", help="a file holding the text to continue")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=200, help="0: the whole vocabulary")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--compile", action="store_true", help="each one-token step as one compiled graph")
    ap.add_argument("--fit-file", help="text whose V fits a codec that needs a fit (default: the embedded plays)")
    ap.add_argument("--fit-dir", default="runs/generate-fits", help="where fits are saved and reused")
    ap.add_argument("--data-dir", default="data", help="where the fit corpus is prepared")
    return ap.parse_args(argv)


def check_args(args):
    """Every problem of the flags that can be told before a model loads."""
    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        problems.append(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        problems.append(f"--top-k must be >= 0, got {args.top_k}")
    if args.prompt_file is not None:
        try:
            args.prompt = Path(args.prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"--prompt-file {args.prompt_file}: cannot read it ({getattr(e, 'strerror', e)})")
    if args.prompt is not None and not args.prompt.strip():
        problems.append("the prompt is empty")
    if args.fit_file is not None and not Path(args.fit_file).is_file():
        problems.append(f"--fit-file {args.fit_file}: no such file")
    if args.v_cache is not None:
        try:
            args.v_cache = json.loads(args.v_cache)
        except json.JSONDecodeError as e:
            problems.append(f"--v-cache is not JSON: {e}")
    if args.ablation_step is not None:
        if args.ablation_step not in STEPS:
            problems.append(f"--ablation-step {args.ablation_step!r}: known steps: {', '.join(STEPS)}")
        else:
            args.v_cache = method_record(train_flags(["--ablation-step", args.ablation_step]))
    model = Path(args.model)
    if args.model != SMOLLM2 and not model.exists():
        problems.append(f"--model {args.model}: no such file or directory (expected {SMOLLM2}, a Hugging Face "
                        f"directory or a training checkpoint)")
    elif args.model != SMOLLM2 and model.is_dir():
        try:
            source_family(args.model)
        except ValueError as e:
            problems.append(f"--model {e}")
    return problems


class Source:
    """The model, its tokenizer's encode / decode, and what a fit reads."""

    def __init__(self, args):
        self.name = args.model
        if Path(args.model).is_file():
            ckpt = load_checkpoint(args.model)
            self.model, run = model_from_checkpoint(ckpt), ckpt.get("args") or {}
            self.run_args = {"tokenizer": "gpt2", **run}
            self.meta = self._checkpoint_meta()
            self.hf_tokenizer = None
        else:
            self.model, self.run_args = load_pretrained(args.model), None
            self.meta = {"tokenizer": args.model, "vocab_size": self.model.config.vocab_size}
            self.hf_tokenizer = load_tokenizer(args.model)
        self.model.eval()

    def _checkpoint_meta(self):
        """Its data's meta (a compact vocabulary's ids are the data's own), or, without
        the data, its tokenizer's when the model reads that tokenizer's ids."""
        a = self.run_args
        try:
            return TokenData(a["data_dir"], a["dataset"], a["tokenizer"]).meta
        except (FileNotFoundError, ValueError, KeyError) as e:
            if self.model.config.vocab_size < get_tokenizer(a["tokenizer"]).vocab_size:
                raise ValueError(f"{self.name} reads the compact vocabulary of its data ({a.get('data_dir')}/"
                                 f"{a.get('dataset')}), which is not here: {e}") from None
            return {"tokenizer": a["tokenizer"], "vocab_size": self.model.config.vocab_size}

    def encode(self, text, chat=False):
        if chat:
            if self.hf_tokenizer is None or not getattr(self.hf_tokenizer, "chat_template", None):
                raise ValueError(f"--chat: {self.name} has no chat template")
            text = self.hf_tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                         add_generation_prompt=True)
        return encode_text(text, self.meta)

    def decode(self, ids):
        return decode_tokens(ids, self.meta)

    def fit_batches(self, fit_file, data_dir, block_size, seed):
        """Input rows (1, block_size) whose V the fit reads: --fit-file's text, else the corpus."""
        if fit_file is not None:
            ids = torch.tensor(self.encode(Path(fit_file).read_text()), dtype=torch.long)
            if ids.numel() < 2:
                raise ValueError(f"--fit-file {fit_file}: too little text to fit on")
            length = min(block_size, ids.numel())
            return list(ids[:ids.numel() // length * length].view(-1, length).split(1))
        if self.run_args is not None:  # a checkpoint: its own training data
            data = open_data(argparse.Namespace(**{**self.run_args, "block_size": block_size}))
        else:
            if not self._prepared(data_dir):
                prepare(FIT_CORPUS, data_dir, tokenizer=self.name)
            data = open_data(argparse.Namespace(dataset=FIT_CORPUS, data_dir=data_dir, tokenizer=self.name,
                                                block_size=block_size))
        return list(calibration_batches(data, FIT_BATCHES, 1, block_size, seed))

    def _prepared(self, data_dir):
        return (Path(data_dir) / dataset_dir_name(FIT_CORPUS, self.name) / "meta.json").is_file()


def fit_key(args, record):
    """The name a fit is saved under: the model, the method, the fit text and the seed."""
    model = Path(args.model)
    stamp = model.stat().st_mtime_ns if model.exists() else 0
    text = Path(args.fit_file).read_bytes() if args.fit_file else FIT_CORPUS.encode()
    h = hashlib.sha256(json.dumps([str(model.resolve()) if model.exists() else args.model, stamp, record,
                                   args.seed], sort_keys=True).encode() + text)
    return h.hexdigest()[:16]


def ensure_fitted(source, args, log):
    """Fit the model's codecs when its method needs a fit, or load the saved fit."""
    model = source.model
    if not model.needs_fit():
        return
    path = Path(args.fit_dir) / f"{fit_key(args, model.config.v_cache)}.pt"
    if path.is_file():
        for codec, state in zip(model.v_codecs(), torch.load(path, weights_only=True)):
            codec.load_state_dict(state)
        log(f"[generate] the fit of {describe(model.config.v_cache)} from {path}")
        return
    t0 = time.perf_counter()
    block = model.config.block_size
    batches = source.fit_batches(args.fit_file, args.data_dir, min(block, 512), args.seed)
    text = args.fit_file or ("its training data" if source.run_args else f"the embedded plays ({FIT_CORPUS})")
    log(f"[generate] fitting {describe(model.config.v_cache)} on V of {sum(b.numel() for b in batches):,} tokens of "
        f"{text} ...")
    with quiet():
        fit_codecs(model, batches, MAX_SAMPLES, seed=args.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save([codec.state_dict() for codec in model.v_codecs()], path)
    log(f"[generate] fitted in {time.perf_counter() - t0:.1f}s, saved to {path}")


def plain_cache_bytes(model, tokens, batch=1):
    """What the plain cache (every key and V as it came) holds for `tokens` tokens."""
    cfg = model.config
    heads = getattr(cfg, "n_kv_head", cfg.n_head)
    itemsize = next(model.parameters()).element_size()
    return 2 * cfg.n_layer * batch * heads * tokens * cfg.head_dim * itemsize


def megabytes(n):
    return f"{n / 2 ** 20:.2f}"


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problems = check_args(args)
    if problems:
        raise ValueError("; ".join(problems))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  (the text alone goes to stdout)
    source = Source(args)
    model, cfg = source.model, source.model.config
    if args.v_cache is not None:
        try:
            model.set_v_cache(args.v_cache)
        except BadSettings as e:
            raise ValueError(f"the method does not fit {args.model} (head_dim {cfg.head_dim}): {e}") from None
    ids = source.encode(args.prompt, args.chat)
    if len(ids) > cfg.block_size:
        raise ValueError(f"the prompt is {len(ids):,} tokens, longer than {args.model}'s context of "
                         f"{cfg.block_size:,}")
    ensure_fitted(source, args, log)
    log(f"[generate] {args.model}, V cache {describe(cfg.v_cache)}; {len(ids)} prompt tokens")
    torch.manual_seed(args.seed)
    prompt = torch.tensor([ids], dtype=torch.long)
    print(source.decode(ids), end="", flush=True)  # what the model reads, then what it writes
    shown, drawn = "", []

    def stream(token):
        nonlocal shown
        drawn.append(int(token[0, 0]))
        text = source.decode(drawn)
        if not text.endswith("\ufffd"):  # a token that ends inside a character waits for the next
            print(text[len(shown):], end="", flush=True)
            shown = text

    stats = {}
    cache = model.make_cache()
    with torch.no_grad():
        out = model.generate(prompt, args.max_new_tokens, temperature=max(args.temperature, 1e-8),
                             top_k=1 if args.temperature == 0 else args.top_k or None, compile=args.compile,
                             timings=stats, cache=cache, on_token=stream)
    print(source.decode(drawn)[len(shown):], flush=True)
    after, end = stats["cache_after_prompt"], stats["cache_at_end"]
    held = cache.length
    line = (f"[generate] prefill {len(ids) / stats['prefill_s']:,.0f} tok/s, decode "
            f"{args.max_new_tokens / stats['decode_s']:,.1f} tok/s; KV cache {megabytes(after['total'])} MB after "
            f"the prompt, {megabytes(end['total'])} MB at the end (keys {megabytes(end['k'])}, V "
            f"{megabytes(end['v'])}, index {megabytes(end['index'])}) for {held:,} tokens; the plain cache "
            f"{megabytes(plain_cache_bytes(model, held))} MB")
    log(line)
    return {"ids": out[0].tolist(), "text": source.decode(drawn), "stats": stats, "cache": cache, "line": line}


if __name__ == "__main__":
    raise SystemExit(run(main))
