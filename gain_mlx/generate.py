"""python -m gain_mlx.generate: generate text with a gain adapter applied, without fusing.

The flags follow ``mlx_lm.generate`` where they apply; the adapter is applied as gain
layers on the loaded base (``loading.load``), checked against its fingerprint.
"""

import argparse

from . import cpu, policy
from .errors import UserError, UsageError, cli
from .loading import load


def build_prompt(tokenizer, prompt: str, system_prompt=None, ignore_chat_template=False):
    """Token ids for ``prompt``: through the chat template when the tokenizer has one."""
    if ignore_chat_template or not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def make_parser():
    p = argparse.ArgumentParser(prog="python -m gain_mlx.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="base model (folder, repo or .gguf; default: packaged SmolLM2)")
    p.add_argument("--adapter-path", help="gain adapter folder or Hugging Face Hub repo id")
    p.add_argument("--prompt", "-p", required=True, help="the prompt ('-' reads stdin)")
    p.add_argument("--max-tokens", "-m", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--ignore-chat-template", action="store_true")
    cpu.add_fast_blas_argument(p)
    return p


def setup(args):
    """The shared start of generate and chat: checked flags, seed, the model with its
    adapter, and the sampler. Returns ``(model, tokenizer, sampler)``."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    if args.max_tokens < 0:
        raise UsageError("--max-tokens must be >= 0")
    if not 0 < args.top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    if not 0 <= args.temp < float("inf"):
        raise UsageError("--temp must be a number >= 0 (0: greedy)")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UsageError("--seed must be in 0 .. 2**64 - 1")
    if args.seed is not None:
        mx.random.seed(args.seed)
    model, tokenizer = load(args.model, args.adapter_path)
    return model, tokenizer, make_sampler(temp=args.temp, top_p=args.top_p)


@cli
def main(argv=None):
    args = make_parser().parse_args(argv)
    policy.start(args.fast_blas)  # here: it re-executes only from the __main__ module
    import sys

    from mlx_lm import generate

    model, tokenizer, sampler = setup(args)
    try:
        prompt = sys.stdin.buffer.read().decode("utf-8") if args.prompt == "-" else args.prompt
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt -: stdin is not UTF-8 text (byte {e.start})") from None
    ids = build_prompt(tokenizer, prompt, args.system_prompt, args.ignore_chat_template)
    print(generate(model, tokenizer, ids, max_tokens=args.max_tokens, sampler=sampler))


if __name__ == "__main__":
    main()
