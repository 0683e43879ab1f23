"""python -m gain_mlx.chat: chat with a model and a gain adapter, like mlx_lm.chat.

Type a message and press Enter; ``q`` quits, ``r`` resets the conversation.
"""

import argparse

from . import cpu, policy
from .errors import UserError, cli
from .generate import setup


def make_parser():
    p = argparse.ArgumentParser(prog="python -m gain_mlx.chat", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="base model (folder, repo or .gguf; default: packaged SmolLM2)")
    p.add_argument("--adapter-path", help="gain adapter folder or Hugging Face Hub repo id")
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system-prompt", default=None)
    cpu.add_fast_blas_argument(p)
    return p


@cli
def main(argv=None):
    args = make_parser().parse_args(argv)
    policy.start(args.fast_blas)  # here: it re-executes only from the __main__ module
    from mlx_lm import stream_generate

    model, tokenizer, sampler = setup(args)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("this model has no chat template: use python -m gain_mlx.generate instead")
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    messages = list(system)
    print("[q] quit, [r] reset the conversation")
    while True:
        try:
            text = input(">> ")
        except EOFError:
            break
        if text.strip() == "q":
            break
        if text.strip() == "r":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reply = ""
        for r in stream_generate(model, tokenizer, ids, max_tokens=args.max_tokens, sampler=sampler):
            print(r.text, end="", flush=True)
            reply += r.text
        print()
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    main()
