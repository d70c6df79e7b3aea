"""A chat's second turn with and without lowvram.PromptCache: time to its first token.

    python benchmarks/chat_turn.py CHECKPOINT [--first 400] [--answer 16] [--new 30]

A first prompt of random ids and its answer fill the cache; the second prompt is the first, the answer and
`--new` more ids (what a chat's next turn looks like to the model), run fresh and then from the cache.
"""

import argparse
import random
import time

import lowvram


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--first", type=int, default=400)
    ap.add_argument("--answer", type=int, default=16)
    ap.add_argument("--new", type=int, default=30)
    a = ap.parse_args()
    m = lowvram.load(a.checkpoint, tokenizer=False)
    rng = random.Random(0)
    vocab = min(m.config.vocab_size, 60000)
    p1 = [rng.randrange(100, vocab) for _ in range(a.first)]
    pc = lowvram.PromptCache()
    answer = m.generate(p1, max_new_tokens=a.answer, stop_token_ids=[], prompt_cache=pc)
    p2 = p1 + answer + [rng.randrange(100, vocab) for _ in range(a.new)]
    for label, kw in (("fresh", {}), ("prompt cache", {"prompt_cache": pc})):
        t = time.perf_counter()
        it = m.stream_generate(p2, max_new_tokens=1, stop_token_ids=[], **kw)
        next(it)
        it.close()
        extra = f" ({pc.reused} tokens from the cache)" if kw else ""
        print(f"{label}: first token {time.perf_counter() - t:.2f} s for a {len(p2)}-token prompt{extra}")


if __name__ == "__main__":
    main()
