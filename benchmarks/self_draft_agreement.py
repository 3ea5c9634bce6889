"""Would a self-drafter pay? How often the first L layers of the served model (then its final
norm and shared LM head: "early exit") predict the same next token as all of its layers.

    python -m benchmarks.self_draft_agreement [--layers 8 12 16 20 24 27] [--max-tokens 96]

The default model generates greedily for the prompts of benchmarks.spec_decode_engine's
workloads-free demo (a repeat-the-article prompt and a chat question); then one forward over
prompt + output records every layer's hidden state, and the agreement at layer L is the share
of output positions where argmax(lm_head(norm(h_L))) equals the full model's token. That share
bounds a greedy early-exit drafter's acceptance rate from above (a draft of k tokens needs k
agreements in a row). One pinned core; prints a table.
"""
from __future__ import annotations

import argparse

from backends.core.model_runner import pin_threads

ARTICLE = ("The city council met on Tuesday to discuss the new park. The new park will have a "
           "playground, a pond and a garden. The council voted to build the new park next year. "
           "The mayor said the new park will have a playground, a pond and a garden for every "
           "family in the city.")
PROMPTS = {
    "repeat-then-summarize": [{"role": "user", "content": ARTICLE + "\n\nRepeat the article "
                               "above, word for word, then summarize it in one sentence."}],
    "chat": [{"role": "user", "content": "What are three good habits for staying healthy?"}],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 12, 16, 20, 24, 27])
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()
    pin_threads([args.core])
    from backends.core.engine import EngineConfig, LLMEngine
    from backends.core.sampling import SamplingParams
    from backends.core.tokenizer import Tokenizer
    from deploy.deployment import DEFAULT_MODEL_PATH

    path = str(DEFAULT_MODEL_PATH)
    engine = LLMEngine.from_path(path, EngineConfig(dtype="bfloat16", prefix_caching=False))
    tok = Tokenizer.load(path)
    model = engine.runner.model
    hidden: dict[int, object] = {}
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda mod, inp, out, i=i: hidden.__setitem__(i, out))
    print(f"{'prompt':24s} " + " ".join(f"L={n:<5d}" for n in args.layers) + f" (of {len(model.layers)})")
    for name, messages in PROMPTS.items():
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True),
                         add_special_tokens=False)
        engine.add_request(name, ids, SamplingParams(max_tokens=args.max_tokens, temperature=0))
        out: list[int] = []
        while engine.has_unfinished():
            out += [t for o in engine.step() for t in o.new_token_ids]
        engine.add_request("probe", ids + out, SamplingParams(max_tokens=1, temperature=0))
        hidden.clear()
        while engine.has_unfinished():
            engine.step()
        n = len(ids)
        full = model.logits(model.norm(hidden[len(model.layers) - 1])).argmax(-1)[n - 1:-1]
        row = []
        for layers in args.layers:
            early = model.logits(model.norm(hidden[layers - 1])).argmax(-1)[n - 1:-1]
            row.append(float((early == full).float().mean()))
        print(f"{name:24s} " + " ".join(f"{a:7.1%}" for a in row))


if __name__ == "__main__":
    main()
